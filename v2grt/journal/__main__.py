"""python -m v2grt.journal convert SEGMENT...: the writer's low-priority child (nice 15)."""

import os
import sys

from v2grt.journal.format import JournalError
from v2grt.journal.read import convert

if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "convert":
        try:
            os.nice(15)
        except OSError:
            pass
        try:
            for seg_path in sys.argv[2:]:
                convert(seg_path)
        except (OSError, JournalError) as exc:  # e.g. retention removed the segment first
            sys.exit(f"v2grt.journal convert: {exc}")
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} convert SEGMENT...")
