"""PEP 316 contracts on the change-stream path check (I10), for CrossHair.

coalesce_core.stream.records.check_path is the single gate every applier calls; a
path it accepts must stay inside the qtree.  CrossHair searches for a path
that passes the check but has a ``..``, ``.`` or empty component or is
absolute.
"""

# crosshair: on

from __future__ import annotations

from coalesce_core.errors import HostilePath
from coalesce_core.stream.records import check_path


def accepted(path: str) -> bool:
    """True if check_path accepts ``path`` (it then stays inside the qtree).

    post: implies(__return__, not path.startswith("/"))
    post: implies(__return__, ".." not in path.split("/"))
    post: implies(__return__, "." not in path.split("/") and "" not in path.split("/"))
    post: implies(__return__, "\\x00" not in path)
    """
    try:
        check_path(path)
    except HostilePath:
        return False
    return True
