"""Tests of the fleet table (v2grt.fleet) and its CSV roster (v2grt.roster)."""

from __future__ import annotations

import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v2grt.fleet import (
    COLUMNS,
    NEVER_HEARD_NS,
    STATE_COLUMNS,
    TELEMETRY_TICK_NS,
    TICK_NEVER,
    TICK_OLDEST,
    TICK_REBASE,
    Fleet,
    FleetError,
    telemetry_ticks,
    validate_node,
)
from v2grt.roster import RosterError, RosterProblem, load_roster, write_roster

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
REQUIRED = {"soc": 0.5, "capacity_kwh": 60.0, "p_dis_max_kw": 11.0, "p_chg_max_kw": 11.0}
HEADER = "node_id,gateway_id,site_id,soc,capacity_kwh,p_dis_max_kw,p_chg_max_kw"


def add_ev(fleet: Fleet, node_id: str, gateway_id: str = "gw1", site_id: str = "site1", **values) -> int:
    return fleet.add(node_id, gateway_id, site_id, **{**REQUIRED, **values})


def write(tmp_path: Path, text: str | bytes, name: str = "roster.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def problems_of(path: Path) -> list[RosterProblem]:
    with pytest.raises(RosterError) as info:
        load_roster(path)
    return info.value.problems


def by_node(fleet: Fleet) -> dict[str, dict[str, object]]:
    """Everything a roster carries about each vehicle, keyed by node id (independent of row numbers)."""
    out = {}
    for node_id, row in fleet.row_of.items():
        rec = {c.name: getattr(fleet, c.name)[row].item() for c in COLUMNS}
        rec["gateway_id"] = fleet.gateway_ids[fleet.gateway[row]]
        site = fleet.site[row]
        rec["site_id"] = fleet.site_ids[site]
        rec["site_limits"] = (fleet.site_export_kw[site].item(), fleet.site_import_kw[site].item())
        out[node_id] = rec
    return out


# ======================================================================================= Fleet
def test_add_fills_rows_in_order_with_defaults():
    """add() puts vehicles in consecutive rows, stores their values and fills defaults."""
    fleet = Fleet()
    rows = [add_ev(fleet, f"EV{i}", soc=0.1 * (i + 1), now_ns=1234) for i in range(3)]
    assert rows == [0, 1, 2]
    assert len(fleet) == 3 and fleet.n_rows == 3
    np.testing.assert_allclose(fleet.column("soc"), [0.1, 0.2, 0.3])
    assert fleet.soh[0] == 1.0 and fleet.efficiency[0] == 0.96 and fleet.temp_c[0] == 25.0
    assert fleet.online[0] == 1 and fleet.active[2] == 1
    assert fleet.last_telemetry_ns[1] == 1234
    assert fleet.row_of == {"EV0": 0, "EV1": 1, "EV2": 2}


def test_remove_clears_row_and_next_add_reuses_it():
    """remove() frees a row (inactive, offline, no id) and the next add() takes that row again."""
    fleet = Fleet()
    for i in range(3):
        add_ev(fleet, f"EV{i}")
    fleet.last_setpoint_kw[1] = 7.0
    assert fleet.remove("EV1") == 1
    assert len(fleet) == 2 and fleet.n_rows == 3
    assert fleet.active[1] == 0 and fleet.online[1] == 0 and fleet.last_setpoint_kw[1] == 0.0
    assert fleet.node_ids[1] is None and "EV1" not in fleet.row_of
    assert add_ev(fleet, "EV_NEW", soc=0.9) == 1
    assert fleet.n_rows == 3 and fleet.row_of["EV_NEW"] == 1 and fleet.soc[1] == 0.9


def test_growth_doubles_capacity_and_preserves_values():
    """Outgrowing the arrays doubles capacity and keeps every existing row's values and id."""
    fleet = Fleet(capacity=64)
    for i in range(64):
        add_ev(fleet, f"EV{i}", soc=i / 100, cycle_count=i)
    assert fleet.capacity == 64
    add_ev(fleet, "EV64", soc=0.64)
    assert fleet.capacity == 128
    for i in range(65, 129):
        add_ev(fleet, f"EV{i}", soc=i / 1000)
    assert fleet.capacity == 256
    np.testing.assert_array_equal(fleet.soc[:64], np.float32(np.arange(64) / 100))  # float32 columns
    np.testing.assert_array_equal(fleet.cycle_count[:64], np.arange(64))
    assert fleet.node_ids[:3] == ["EV0", "EV1", "EV2"] and len(fleet.node_ids) == 256
    for name, _ in STATE_COLUMNS:
        assert len(getattr(fleet, name)) == 256, name


def test_reserve_then_add_never_reallocates():
    """After reserve(n), adding n vehicles keeps every array object (no reallocation per add)."""
    fleet = Fleet()
    fleet.reserve(1000)
    names = [c.name for c in COLUMNS] + [name for name, _ in STATE_COLUMNS]
    before = {name: getattr(fleet, name) for name in names}
    for i in range(1000):
        add_ev(fleet, f"EV{i}")
    assert fleet.capacity == 1000
    assert all(getattr(fleet, name) is before[name] for name in names)


def test_gateway_rows_lists_active_rows_of_one_gateway():
    """gateway_rows() gives the ascending active rows of exactly one gateway (gw1 is not gw10)."""
    fleet = Fleet()
    for i, gw in enumerate(["gw1", "gw10", "gw1", "gw2", "gw1", "gw10"]):
        add_ev(fleet, f"EV{i}", gateway_id=gw)
    fleet.remove("EV2")
    np.testing.assert_array_equal(fleet.gateway_rows("gw1"), [0, 4])
    np.testing.assert_array_equal(fleet.gateway_rows("gw10"), [1, 5])
    assert fleet.gateway_rows("gw_unknown").size == 0
    assert fleet.gateway_ids == ["gw1", "gw10", "gw2"]


def test_unknown_node_ids_are_named():
    """remove() and rows() of an id not in the fleet raise FleetError naming that id."""
    fleet = Fleet()
    add_ev(fleet, "EV1")
    with pytest.raises(FleetError, match="EV_GHOST"):
        fleet.remove("EV_GHOST")
    with pytest.raises(FleetError, match="EV_GHOST"):
        fleet.rows(["EV1", "EV_GHOST"])
    np.testing.assert_array_equal(fleet.rows(["EV1"]), [0])


def test_duplicate_add_is_refused_and_changes_nothing():
    """Adding an id twice raises FleetError naming it and its row, and leaves the first vehicle as it was."""
    fleet = Fleet()
    add_ev(fleet, "EV1", soc=0.3)
    with pytest.raises(FleetError, match=r"'EV1'.*row 0"):
        add_ev(fleet, "EV1", soc=0.9)
    assert len(fleet) == 1 and fleet.n_rows == 1 and fleet.soc[0] == 0.3


@pytest.mark.parametrize(
    ("field", "value"),
    [("soc", math.nan), ("capacity_kwh", -5.0), ("soc", 1.5), ("efficiency", 0.3), ("online", 0.5),
     ("temp_c", "warm")],
)
def test_validate_node_names_node_field_and_value(field, value):
    """validate_node rejects NaN, negative, out-of-range and non-numeric values, naming node, field and value."""
    with pytest.raises(FleetError) as info:
        validate_node("EV_NODE_07", {**REQUIRED, field: value})
    msg = str(info.value)
    assert "EV_NODE_07" in msg and repr(field) in msg and repr(value) in msg


def test_validate_node_missing_and_unknown_fields():
    """A missing required field and an unknown field are each named."""
    with pytest.raises(FleetError, match="'capacity_kwh' is required"):
        validate_node("EV1", {"soc": 0.5, "p_dis_max_kw": 11, "p_chg_max_kw": 11})
    with pytest.raises(FleetError, match="capacity_kw"):
        validate_node("EV1", {**REQUIRED, "capacity_kw": 60})
    assert validate_node("EV1", REQUIRED)["efficiency"] == 0.96


@pytest.mark.parametrize(
    ("node_id", "gateway_id", "site_id", "values"),
    [("EV1", "gw_new", "bad site", {}), ("EV1", "gw_new", "site_new", {"soc": 2.0}),
     ("EV 1", "gw_new", "site_new", {})],
)
def test_failed_add_leaves_fleet_unchanged(node_id, gateway_id, site_id, values):
    """A refused add() registers no gateway, site or row (a bad site id used to leave its gateway behind)."""
    fleet = Fleet()
    add_ev(fleet, "EV0")
    with pytest.raises(FleetError):
        add_ev(fleet, node_id, gateway_id, site_id, **values)
    assert fleet.gateway_ids == ["gw1"] and fleet.site_ids == ["site1"]
    assert len(fleet) == 1 and fleet.n_rows == 1


def test_random_fleet_is_realistic():
    """Fleet.random gives plausible packs, chargers, SoC, health, temperatures and some offline vehicles."""
    n = 5000
    fleet = Fleet.random(n, seed=7)
    assert len(fleet) == n and fleet.n_rows == n
    cap = fleet.column("capacity_kwh")
    assert cap.min() >= 40 and cap.max() <= 100 and len(np.unique(cap)) >= 5
    assert set(np.unique(fleet.column("p_dis_max_kw"))) == set(np.float32([7.4, 11.0, 22.0]))
    np.testing.assert_array_equal(fleet.column("p_chg_max_kw"), fleet.column("p_dis_max_kw"))
    offline = np.count_nonzero(fleet.column("online") == 0)
    assert 0 < offline < 0.1 * n
    soc = fleet.column("soc")
    assert soc.min() >= 0 and soc.max() <= 1 and 0.5 < soc.mean() < 0.7
    assert np.all((fleet.column("soh") >= 0.55) & (fleet.column("soh") <= 1.0))
    assert np.median(fleet.column("soh")) > 0.85
    eff = fleet.column("efficiency")
    assert eff.min() >= 0.94 and eff.max() <= 0.985
    assert -40 < fleet.column("temp_c").min() and fleet.column("temp_c").max() < 60
    assert len(fleet.gateway_ids) == 10 and len(fleet.site_ids) == 100
    assert np.all(np.diff(fleet.column("gateway")) >= 0) and np.all(np.diff(fleet.column("site")) >= 0)
    assert fleet.node_ids[0] == "EV_NODE_0001" and fleet.row_of["EV_NODE_5000"] == n - 1
    np.testing.assert_array_equal(fleet.gateway_rows("gw1"), np.arange(500))
    for row in range(0, n, 97):
        validate_node(fleet.node_ids[row], {c.name: getattr(fleet, c.name)[row] for c in COLUMNS})


def test_random_fleet_is_reproducible_from_its_seed():
    """The same seed gives the same fleet bit for bit; another seed gives another fleet."""
    a, b, c = Fleet.random(1000, seed=3), Fleet.random(1000, seed=3), Fleet.random(1000, seed=4)
    for col in COLUMNS:
        np.testing.assert_array_equal(a.column(col.name), b.column(col.name))
    assert not np.array_equal(a.column("soc"), c.column("soc"))
    assert not np.array_equal(a.column("capacity_kwh"), c.column("capacity_kwh"))


def test_random_fleet_can_grow_and_be_empty():
    """A random fleet takes further vehicles like any other, and n=0 gives an empty fleet."""
    fleet = Fleet.random(10, seed=1, n_gateways=2, n_sites=3)
    assert add_ev(fleet, "EV_EXTRA", "gw2", "site3") == 10 and fleet.capacity >= 11
    assert fleet.soc[0] == Fleet.random(10, seed=1).soc[0]
    assert len(Fleet.random(0)) == 0
    with pytest.raises(FleetError, match="n=-1"):
        Fleet.random(-1)


def test_site_limits_are_stored_checked_and_survive_growth():
    """set_site_limits stores kW caps (inf by default), refuses negative or NaN, and survives site growth."""
    fleet = Fleet(site_capacity=2)
    fleet.set_site_limits("depot", export_kw=40.0, import_kw=50.0)
    add_ev(fleet, "EV1", site_id="depot")
    s = fleet.site_index("depot")
    assert (fleet.site_export_kw[s], fleet.site_import_kw[s]) == (40.0, 50.0)
    other = fleet.site_index("other")
    assert math.isinf(fleet.site_export_kw[other]) and math.isinf(fleet.site_import_kw[other])
    for i in range(5):
        fleet.site_index(f"extra{i}")
    assert fleet.site_capacity >= 7 and fleet.n_sites == 7
    assert (fleet.site_export_kw[s], fleet.site_import_kw[s]) == (40.0, 50.0)
    with pytest.raises(FleetError, match=r"'depot'.*export_kw=-1"):
        fleet.set_site_limits("depot", export_kw=-1.0)
    with pytest.raises(FleetError, match="import_kw=nan"):
        fleet.set_site_limits("depot", import_kw=math.nan)
    assert fleet.site_export_kw[s] == 40.0


# ====================================================================================== roster
def test_roster_round_trip_keeps_every_value(tmp_path):
    """write_roster then load_roster gives the same vehicles, values (bit for bit), gateways, sites and caps."""
    fleet = Fleet.random(300, seed=11, n_gateways=3, n_sites=7, offline_fraction=0.1)
    fleet.set_site_limits("site2", export_kw=40.0, import_kw=55.5)
    fleet.set_site_limits("site5", export_kw=1.0 / 3.0)
    for node_id in ("EV_NODE_007", "EV_NODE_150"):
        fleet.remove(node_id)
    path = tmp_path / "fleet.csv"
    write_roster(fleet, path)
    loaded = load_roster(path, now_ns=99)
    assert len(loaded) == 298 and loaded.n_rows == 298
    assert by_node(loaded) == by_node(fleet)
    assert loaded.node_ids[:3] == ["EV_NODE_001", "EV_NODE_002", "EV_NODE_003"]
    assert np.all(loaded.column("last_telemetry_ns") == 99) and np.all(loaded.column("active") == 1)
    write_roster(loaded, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_text() == path.read_text()


def test_roster_round_trip_without_site_caps_has_no_cap_columns(tmp_path):
    """A fleet with no finite site cap is written without the site columns, and loads back uncapped."""
    fleet = Fleet.random(20, seed=2)
    path = tmp_path / "fleet.csv"
    write_roster(fleet, path)
    assert "site_export_kw" not in path.read_text()
    loaded = load_roster(path)
    assert by_node(loaded) == by_node(fleet)


def test_roster_round_trip_quotes_awkward_ids(tmp_path):
    """Ids with a comma, a quote or a leading '#' survive a round trip (quoted, not read as comments)."""
    fleet = Fleet()
    for node_id in ("a,b", "#hash", 'q"uote', "plain"):
        add_ev(fleet, node_id, gateway_id="gw,1", site_id="#site")
    path = tmp_path / "fleet.csv"
    write_roster(fleet, path)
    loaded = load_roster(path)
    assert list(loaded.row_of) == ["a,b", "#hash", 'q"uote', "plain"]
    assert loaded.gateway_ids == ["gw,1"] and loaded.site_ids == ["#site"]


def test_roster_tolerates_bom_crlf_comments_blank_lines_and_padding(tmp_path):
    """A UTF-8 BOM, CRLF line ends, '#' comments, blank lines and padded cells all load cleanly."""
    text = ("# exported by the depot tool\r\n\r\n"
            " node_id , gateway_id , site_id , soc , capacity_kwh , p_dis_max_kw , p_chg_max_kw \r\n"
            "   # a comment indented\r\n"
            "EV_A , gw1 , s1 , 0.5 , 60 , 11 , 11\r\n"
            "\t\r\n"
            "EV_B,gw1,s1,0.75,77,22,22\r\n")
    path = write(tmp_path, b"\xef\xbb\xbf" + text.encode())
    fleet = load_roster(path)
    assert list(fleet.row_of) == ["EV_A", "EV_B"]
    np.testing.assert_array_equal(fleet.column("soc"), [0.5, 0.75])
    np.testing.assert_array_equal(fleet.column("p_dis_max_kw"), [11, 22])
    assert fleet.gateway_ids == ["gw1"] and fleet.site_ids == ["s1"]


def test_hand_written_fixture_loads_with_defaults():
    """tests/data/roster_small.csv (reordered columns, omitted and empty optional cells) loads as written."""
    fleet = load_roster(DATA / "roster_small.csv")
    assert list(fleet.row_of) == ["EV_NODE_01", "EV_NODE_02", "EV_NODE_03"]
    np.testing.assert_array_equal(fleet.column("temp_c"), np.float32([18.5, 25.0, -3.0]))  # empty -> default
    np.testing.assert_array_equal(fleet.column("capacity_kwh"), [77, 58, 100])
    np.testing.assert_array_equal(fleet.column("p_chg_max_kw"), np.float32([11, 7.4, 22]))
    assert np.all(fleet.column("soh") == 1.0) and np.all(fleet.column("online") == 1)
    assert fleet.gateway_ids == ["gw1", "gw2"] and fleet.site_ids == ["depot_a", "depot_b"]
    np.testing.assert_array_equal(fleet.gateway_rows("gw2"), [2])


BAD_ROWS = [  # (extra header columns, the bad row, column, value, words in the reason)
    ("", "EV_BAD,gw1,site1,,60,11,11", "soc", "", "required value missing"),
    ("", "EV_BAD,gw1,site1,abc,60,11,11", "soc", "abc", "not a number"),
    ("", "EV_BAD,gw1,site1,NaN,60,11,11", "soc", "NaN", "NaN is not allowed"),
    ("", "EV_BAD,gw1,site1,1.5,60,11,11", "soc", "1.5", "out of range; expected 0..1"),
    ("", "EV_BAD,gw1,site1,0.5,-5,11,11", "capacity_kwh", "-5", "out of range"),
    ("", "EV_BAD,gw1,site1,0.5,60,inf,11", "p_dis_max_kw", "inf", "out of range"),
    (",efficiency", "EV_BAD,gw1,site1,0.5,60,11,11,0.3", "efficiency", "0.3", "expected 0.5..1"),
    (",online", "EV_BAD,gw1,site1,0.5,60,11,11,2", "online", "2", "out of range"),
    (",online", "EV_BAD,gw1,site1,0.5,60,11,11,0.5", "online", "0.5", "must be 0 or 1"),
    ("", ",gw1,site1,0.5,60,11,11", "node_id", "", "required value missing"),
    ("", "EV_BAD,,site1,0.5,60,11,11", "gateway_id", "", "required value missing"),
    ("", 'EV_BAD,"gw 1",site1,0.5,60,11,11', "gateway_id", "gw 1", "without spaces"),
    ("", "EV_BAD,gw1,site1,0.5,60,11", None, None, "6 fields, expected 7"),
    ("", "EV_BAD,gw1,site1,0.5,60,11,11,", None, None, "8 fields, expected 7"),
    ("", 'EV_BAD,gw1,site1,0.5,"60,11,11', None, 'EV_BAD,gw1,site1,0.5,"60,11,11', "bad CSV quoting"),
]


@pytest.mark.parametrize(("extra", "row", "column", "value", "reason"), BAD_ROWS)
def test_bad_row_is_reported_at_its_line_and_column(tmp_path, extra, row, column, value, reason):
    """Each kind of bad row gives one problem with the file, the physical line, the column, value and reason."""
    good = "EV_OK,gw1,site1,0.5,60,11,11" + (",1" if extra else "")
    path = write(tmp_path, f"# roster\n{HEADER}{extra}\n{good}\n\n{row}\n{good.replace('OK', 'OK2')}\n")
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.column, problem.value) == (str(path), 5, column, value)
    assert reason in problem.reason
    assert f"{path}:5:" in str(problem)


def test_duplicate_node_id_names_both_lines(tmp_path):
    """A node id used twice is reported on its second line, naming the first."""
    path = write(tmp_path, f"{HEADER}\nEV1,gw1,s1,0.5,60,11,11\nEV2,gw1,s1,0.5,60,11,11\n"
                           "EV1,gw2,s1,0.6,60,11,11\n")
    (problem,) = problems_of(path)
    assert (problem.line, problem.column, problem.value) == (4, "node_id", "EV1")
    assert "duplicate" in problem.reason and "line 2" in problem.reason


def test_all_problems_are_reported_together_in_line_order(tmp_path):
    """Several bad rows (and several bad cells in one row) are all reported in one RosterError, by line."""
    path = write(tmp_path, f"{HEADER}\n"
                           "EV1,gw1,s1,1.5,60,11,11\n"           # line 2: soc
                           "EV2,gw1,s1,0.5,60,11,11\n"
                           "EV3,gw1,s1,x,-1,11,11\n"             # line 4: soc and capacity
                           "EV4,gw1,s1,0.5\n"                    # line 5: field count
                           "EV1,gw1,s1,0.5,60,11,11\n")          # line 6: duplicate
    with pytest.raises(RosterError) as info:
        load_roster(path)
    got = [(p.line, p.column) for p in info.value.problems]
    assert got == [(2, "soc"), (4, "soc"), (4, "capacity_kwh"), (5, None), (6, "node_id")]
    text = str(info.value)
    assert text.startswith("5 problems in roster") and "nothing was loaded" in text
    for line in (2, 4, 5, 6):
        assert f"{path}:{line}:" in text


def test_unknown_and_missing_columns_are_named(tmp_path):
    """A misspelt column is named with a suggestion, and the required column it was meant to be is missing."""
    path = write(tmp_path, "node_id,gateway_id,site_id,soc,capacity_kw,p_dis_max_kw,p_chg_max_kw\n"
                           "EV1,gw1,s1,0.5,60,11,11\n")
    problems = problems_of(path)
    assert [(p.line, p.column) for p in problems] == [(1, "capacity_kw"), (1, "capacity_kwh")]
    assert "unknown column; did you mean 'capacity_kwh'?" in problems[0].reason
    assert "required column missing" in problems[1].reason
    assert "column 'capacity_kw': unknown column" in str(problems[0])


def test_duplicate_header_column_is_reported(tmp_path):
    """A column named twice in the header is an error naming both positions."""
    path = write(tmp_path, f"{HEADER},soc\nEV1,gw1,s1,0.5,60,11,11,0.6\n")
    (problem,) = problems_of(path)
    assert problem.column == "soc" and "fields 4 and 8" in problem.reason


class CountingFleet(Fleet):
    instances = 0

    def __init__(self, *args, **kwargs):
        type(self).instances += 1
        super().__init__(*args, **kwargs)


def test_nothing_is_half_loaded(tmp_path):
    """A roster with one bad row among many good ones builds no fleet at all; a good one builds exactly one."""
    good = [f"EV{i},gw1,s1,0.5,60,11,11" for i in range(99)]
    bad = write(tmp_path, "\n".join([HEADER, *good, "EV99,gw1,s1,0.5,60,11,-11"]) + "\n", "bad.csv")
    CountingFleet.instances = 0
    with pytest.raises(RosterError):
        CountingFleet.from_csv(bad)
    assert CountingFleet.instances == 0
    fine = write(tmp_path, "\n".join([HEADER, *good]) + "\n", "fine.csv")
    fleet = CountingFleet.from_csv(fine, now_ns=5)
    assert isinstance(fleet, CountingFleet) and CountingFleet.instances == 1
    assert len(fleet) == 99 and fleet.last_telemetry_ns[98] == 5


def test_error_listing_is_capped_but_problems_are_all_kept(tmp_path):
    """str(RosterError) lists 50 problems and says how many more; .problems keeps all of them."""
    rows = [f"EV{i},gw1,s1,7,60,11,11" for i in range(60)]
    path = write(tmp_path, "\n".join([HEADER, *rows]) + "\n")
    with pytest.raises(RosterError) as info:
        load_roster(path)
    err = info.value
    assert len(err.problems) == 60 and [p.line for p in err.problems] == list(range(2, 62))
    lines = str(err).splitlines()
    assert len(lines) == 1 + 50 + 1 and lines[-1].strip() == "... and 10 more"
    assert isinstance(err, ValueError)
    assert pickle.loads(pickle.dumps(err)).problems == err.problems


def test_site_limit_columns_are_applied(tmp_path):
    """site_export_kw / site_import_kw cap their site; empty cells and inf mean no cap."""
    path = write(tmp_path, f"{HEADER},site_export_kw,site_import_kw\n"
                           "EV1,gw1,depot,0.5,60,11,11,40,50\n"
                           "EV2,gw1,depot,0.5,60,11,11,,\n"
                           "EV3,gw1,depot,0.5,60,11,11,40,50\n"
                           "EV4,gw1,office,0.5,60,11,11,inf,12.5\n"
                           "EV5,gw1,open,0.5,60,11,11,,\n")
    fleet = load_roster(path)
    limits = {s: (fleet.site_export_kw[i], fleet.site_import_kw[i]) for i, s in enumerate(fleet.site_ids)}
    assert limits == {"depot": (40.0, 50.0), "office": (math.inf, 12.5), "open": (math.inf, math.inf)}


def test_site_limits_must_agree_and_be_non_negative(tmp_path):
    """Rows of one site stating different caps are reported naming both lines; negative and NaN caps too."""
    path = write(tmp_path, f"{HEADER},site_export_kw\n"
                           "EV1,gw1,depot,0.5,60,11,11,40\n"
                           "EV2,gw1,depot,0.5,60,11,11,45\n"
                           "EV3,gw1,other,0.5,60,11,11,-1\n"
                           "EV4,gw1,other,0.5,60,11,11,nan\n"
                           "EV5,gw1,other,0.5,60,11,11,lots\n")
    problems = problems_of(path)
    assert [(p.line, p.column, p.value) for p in problems] == [
        (3, "site_export_kw", "45"), (4, "site_export_kw", "-1"), (5, "site_export_kw", "nan"),
        (6, "site_export_kw", "lots")]
    assert "'depot'" in problems[0].reason and "line 2" in problems[0].reason
    assert "kW >= 0" in problems[1].reason and "not a number" in problems[3].reason


def test_example_config_loads():
    """configs/fleet_example.csv loads as 12 vehicles EV_NODE_01..12 behind 2 gateways at 3 sites."""
    fleet = Fleet.from_csv(ROOT / "configs" / "fleet_example.csv")
    assert list(fleet.row_of) == [f"EV_NODE_{i:02d}" for i in range(1, 13)]
    assert fleet.gateway_ids == ["gw1", "gw2"] and len(fleet.site_ids) == 3
    assert 0 < np.count_nonzero(fleet.column("online") == 0) < 12
    capped = [s for i, s in enumerate(fleet.site_ids) if np.isfinite(fleet.site_export_kw[i])]
    assert len(capped) == 2


def test_empty_and_header_only_rosters(tmp_path):
    """A file without a header is an error; a header with no rows is an empty fleet."""
    (problem,) = problems_of(write(tmp_path, "# nothing here\n\n", "empty.csv"))
    assert "no header row" in problem.reason
    fleet = load_roster(write(tmp_path, f"{HEADER}\n", "header.csv"))
    assert len(fleet) == 0 and fleet.n_rows == 0


def test_non_utf8_roster_names_the_line(tmp_path):
    """A byte that is not UTF-8 (a Latin-1 file) is reported with its line number."""
    path = write(tmp_path, f"{HEADER}\nEV1,gw1,s1,0.5,60,11,11\nEV\xe92,gw1,s1,0.5,60,11,11\n".encode("latin-1"))
    (problem,) = problems_of(path)
    assert problem.line == 3 and "not UTF-8" in problem.reason


def test_missing_file_raises_oserror(tmp_path):
    """A roster that does not exist raises FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_roster(tmp_path / "nope.csv")


def test_every_row_passes_through_validate_node(tmp_path, monkeypatch):
    """A rule added to fleet.validate_node alone still stops a roster row (the loader cannot bypass it)."""
    import v2grt.roster

    def stricter(node_id, values):
        checked = validate_node(node_id, values)
        if checked["soc"] > 0.9:
            raise FleetError(f"node {node_id!r}: field 'soc'={values['soc']!r} above the new 0.9 rule")
        return checked

    monkeypatch.setattr(v2grt.roster, "validate_node", stricter)
    path = write(tmp_path, f"{HEADER}\nEV1,gw1,s1,0.5,60,11,11\nEV2,gw1,s1,0.95,60,11,11\n")
    (problem,) = problems_of(path)
    assert problem.line == 3 and "'EV2'" in problem.reason and "0.9 rule" in problem.reason


CELL_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 5).map(str),
    st.text(alphabet="0123456789.-+eEinfa_ x", min_size=1, max_size=8).filter(lambda s: s.strip()),
)


@settings(max_examples=150, deadline=None)
@given(col=st.sampled_from(COLUMNS), cell=CELL_TEXT)
def test_roster_accepts_exactly_what_validate_node_accepts(col, cell):
    """The roster's column-wise checks agree with fleet.validate_node on every value (one set of rules)."""
    try:
        validate_node("EV1", {**REQUIRED, col.name: cell})
        expected_ok = True
    except FleetError:
        expected_ok = False
    values = {**REQUIRED, col.name: cell.strip()}
    names = ["node_id", "gateway_id", "site_id", *values]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.csv"
        path.write_text(",".join(names) + "\nEV1,gw1,s1," + ",".join(map(str, values.values())) + "\n")
        try:
            fleet = load_roster(path)
        except RosterError as exc:
            assert not expected_ok, str(exc)
            assert [p.column for p in exc.problems] == [col.name]
        else:
            assert expected_ok
            assert getattr(fleet, col.name)[0] == float(cell)


def test_unreadable_header_stops_at_the_header(tmp_path):
    """A header with broken quoting is the one problem reported (its data rows are not taken for a header)."""
    path = write(tmp_path, f'# roster\n"node_id,{HEADER[8:]}\nEV1,gw1,s1,0.5,60,11,11\n')
    (problem,) = problems_of(path)
    assert problem.line == 2 and "bad CSV quoting" in problem.reason


def test_documented_roster_columns_are_the_loader_s_columns():
    """docs/operations.md's roster table lists every roster.py column with its required-ness, unit, range, default."""
    from v2grt.roster import REQUIRED_COLUMNS, ROSTER_COLUMNS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    block = doc.split("<!-- roster-columns -->\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = {cells[0].strip("`"): cells for cells in
            ([c.strip() for c in line.strip().strip("|").split("|")] for line in block[2:])}
    assert list(rows) == list(ROSTER_COLUMNS)
    assert [name for name, cells in rows.items() if cells[1] == "yes"] == list(REQUIRED_COLUMNS)
    for col in COLUMNS:
        _name, _required, unit, allowed, default, _used = rows[col.name]
        assert unit == col.unit, col.name
        if col.dtype == "uint8":
            assert allowed == f"{col.lo:g} or {col.hi:g}", col.name
        else:
            assert allowed.split(" ")[0] == f"{col.lo:g}..{col.hi:g}".replace("1e+06", "1000000"), col.name
        assert default == ("" if col.default is None else f"{col.default:g}"), col.name


def test_mark_never_heard_counts_only_vehicles_and_telemetry_clears_it():
    """mark_never_heard() sets every row to NEVER_HEARD_NS and counts the vehicles; a row that reports
    leaves the count, and a free row is never counted."""
    fleet = Fleet.random(5, seed=3, now_ns=123)
    fleet.remove("EV_NODE_05")
    assert fleet.count_never_heard() == 0
    assert fleet.mark_never_heard() == 4
    assert fleet.count_never_heard() == 4 and (fleet.last_telemetry_ns[:5] == NEVER_HEARD_NS).all()
    fleet.last_telemetry_ns[fleet.row_of["EV_NODE_02"]] = 10**9
    assert fleet.count_never_heard() == 3


# ---------------------------------------------------------------- telemetry times and the kernel's ticks
def expected_ticks(fleet: Fleet) -> np.ndarray:
    """The int32 ticks every row should hold: its exact time, floored to 1 ms ticks since the epoch."""
    return telemetry_ticks(fleet._telemetry_ns, fleet.telemetry_epoch_ns)


def test_every_way_of_writing_a_telemetry_time_sets_the_kernels_tick():
    """Scalar, slice, fancy-index and per-row writes, add(), growth and mark_never_heard() all leave
    telemetry_tick equal to the exact time floored to 1 ms ticks; NEVER_HEARD_NS is TICK_NEVER."""
    fleet = Fleet.random(10, seed=1, now_ns=7_654_321)
    assert (fleet.telemetry_tick[:10] == 7).all()
    fleet.last_telemetry_ns[3] = -1  # 1 ns before the epoch: tick -1 (floor, not truncation)
    fleet.last_telemetry_ns[4:6] = 2_000_000_000
    fleet.last_telemetry_ns[np.array([6, 8])] = [5_999_999, NEVER_HEARD_NS]
    add_ev(fleet, "EV_NEW", now_ns=123_456_789)  # grows the table
    assert fleet.capacity > 11
    assert list(fleet.telemetry_tick[[3, 4, 5, 6, 8, 10]]) == [-1, 2000, 2000, 5, TICK_NEVER, 123]
    np.testing.assert_array_equal(fleet.telemetry_tick, expected_ticks(fleet))
    fleet.mark_never_heard()
    assert (fleet.telemetry_tick == TICK_NEVER).all() and fleet.count_never_heard() == 11


def test_telemetry_times_read_exactly_and_refuse_writes_that_would_bypass_the_tick():
    """Reads give the exact int64 ns; a slice read is a read-only view, so nobody can write a time the
    kernel's tick would not follow."""
    fleet = Fleet.random(4, seed=1, now_ns=1_234_567)
    assert fleet.last_telemetry_ns[2] == 1_234_567 and fleet.last_telemetry_ns[:4].dtype == np.int64
    view = fleet.last_telemetry_ns[:4]
    with pytest.raises(ValueError):
        view[0] = 0
    assert np.asarray(fleet.last_telemetry_ns).shape == (fleet.capacity,)


def test_a_time_far_past_the_epoch_moves_the_epoch_and_recomputes_every_tick():
    """A telemetry time TICK_REBASE ticks (~12 days) past the epoch rebases it to that time; older rows keep
    their age in ticks, and a row older than int32 ticks reach becomes TICK_OLDEST, still stale."""
    fleet = Fleet.random(3, seed=1, now_ns=0)
    t_far = TICK_REBASE * TELEMETRY_TICK_NS + 5
    fleet.last_telemetry_ns[0] = t_far
    assert fleet.telemetry_epoch_ns == t_far
    assert list(fleet.telemetry_tick[:3]) == [0, -TICK_REBASE - 1, -TICK_REBASE - 1]
    fleet.last_telemetry_ns[1] = t_far + 2**31 * TELEMETRY_TICK_NS  # another jump: rebases again
    assert fleet.telemetry_tick[2] == TICK_OLDEST and fleet.telemetry_tick[1] == 0
    np.testing.assert_array_equal(fleet.telemetry_tick, expected_ticks(fleet))
    assert fleet.last_telemetry_ns[2] == 0  # the exact time is kept whatever the tick


@pytest.mark.parametrize("now_ns, stale_after_s, expected", [
    (0, 5.0, -5000),
    (5_000_999_999, 5.0, 0),  # 5000 ticks of age at most: tick 0 is still fresh
    (-(2**62), 5.0, TICK_OLDEST),  # a clock before every tick: only never-heard rows are stale
    (2**62, 0.01, 2**31 - 1),  # a clock past int32's ticks: every row is stale
])
def test_stale_tick_is_now_minus_the_limit_in_whole_ticks_clamped_to_int32(now_ns, stale_after_s, expected):
    """stale_tick: now's tick minus stale_after_s in whole 1 ms ticks, clamped into (TICK_NEVER, int32 top]."""
    assert Fleet().stale_tick(now_ns, stale_after_s) == expected
