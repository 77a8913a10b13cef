"""Reading a sim volume beside the process that writes it (docs/sim.md, "Reading beside an agent").

The read verbs (``coalesce sim ls``, ``cat``, ``get``, ``info``) take no lock and write nothing,
as the group's read verbs read the ledger beside a running agent (docs/operations.md): they mount
the newest CP on the media read-only (:class:`~.fs.SimFS` ``readonly``) and read from it.  The
writer never overwrites a block of its last complete CP, and a block freed by CP n+1 is reused from
CP n+2 on, so what was read from CP n is intact if, once read, the media is at most at CP n+1; a
PCPI's blocks are never reused while the PCPI exists, so what was read from a PCPI is intact if the
PCPI (same name, same root) is still there.  Otherwise (the writer moved on under the read) the
read is done again, a few times, and then refused with a hint to read a PCPI or an exported image,
which stay put.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import BackendError, CoalesceError
from coalesce_core.stream.records import check_path_or_root

from .fs import DIR, LNK, REG, Inode, SimFS, View

T = TypeVar("T")
ATTEMPTS = 5


class Image:
    """Which image of the volume a read verb reads: the active FS (``pcpi`` None), a PCPI by name,
    or (``exported``) for each qtree the PCPI the volume exports for the replica of that name."""

    def __init__(self, pcpi: str | None = None, exported: bool = False) -> None:
        if pcpi is not None and exported:
            raise BackendError("--pcpi and --export name two images", hint="give one of them")
        self.pcpi = pcpi
        self.exported = exported
        self.read: set[str | None] = set()  # the images a read went to (None: the active FS)

    def label(self, qtree: str) -> str:
        if self.pcpi is not None:
            return f"PCPI {self.pcpi!r}"
        return f"the image exported for {qtree!r}" if self.exported else "the active file system"

    def view(self, fs: SimFS, qtree: str) -> View:
        """The image to read ``qtree`` in (remembered, for :func:`intact`)."""
        name = self.pcpi
        if self.exported:
            exports = fs.exports()
            name = exports.get(qtree)
            if name is None:
                raise BackendError(
                    f"{qtree!r} is not exported by sim volume {fs.path}",
                    hint=f"exported: {', '.join(sorted(exports)) or 'nothing'}; without --export the active "
                    "file system is read",
                )
            if name == ACTIVE:
                name = None  # a broken replica exports its active file system
        self.read.add(name)
        return fs.view(name)


def intact(fs: SimFS, images: set[str | None]) -> bool:
    """True if nothing the read-only mount ``fs`` read from ``images`` was overwritten since."""
    for _ in range(ATTEMPTS):
        now = SimFS(fs.path, readonly=True)
        try:
            if now.cp <= fs.cp + 1:
                return True
            if None in images:
                return False  # the active FS of CP n: its freed blocks may be reused from CP n+2 on
            then = {p["name"]: p["root"] for p in fs.meta["pcpis"]}
            still = {p["name"]: p["root"] for p in now.meta["pcpis"]}
            held = all(n is not None and still.get(n) == then.get(n) for n in images)
            again = SimFS(fs.path, readonly=True)  # the PCPI table just read was itself intact?
            try:
                if again.cp <= now.cp + 1:
                    return held
            finally:
                again.raid.close()
        finally:
            now.raid.close()
    return False


def read_volume(path: str, image: Image, read: Callable[[SimFS], T], hint: str | None = None) -> T:
    """``read(fs)`` on a read-only mount of the volume at ``path``, done again while the writer
    overwrote what it read (see the module docstring); the result of the first intact read."""
    for _ in range(ATTEMPTS):
        image.read = set()
        fs = SimFS(path, readonly=True)
        try:
            try:
                result = read(fs)
            except CoalesceError:
                if intact(fs, image.read):
                    raise  # a real answer (no such path, ...), not a read torn by the writer
                continue
            except Exception:
                if intact(fs, image.read):
                    raise
                continue  # garbage read from blocks the writer reused meanwhile
            if intact(fs, image.read):
                return result
        finally:
            fs.raid.close()
    raise BackendError(
        f"sim volume {path} changed under the read {ATTEMPTS} times: a process is writing it",
        hint=hint
        or "read a PCPI (--pcpi NAME) or what a replica exports (--export): they stay put while "
        "they exist; or read again when the agent is idle",
    )


# ---------------------------------------------------------------------------------- paths in an image
def split(path: str) -> tuple[str, str]:
    """``qtree[/rest]`` -> (qtree, rest); refuses a path that could leave the qtree (I10)."""
    path = path.strip("/")
    if not path:
        raise BackendError("no qtree named", hint="write QTREE or QTREE/PATH (`coalesce sim ls VOLUME` lists them)")
    qtree, _, rest = path.partition("/")
    check_path_or_root(qtree, what="qtree")
    check_path_or_root(rest)
    return qtree, rest


def resolve(view: View, qtree: str, rest: str, label: str) -> tuple[int, Inode]:
    """The inode at ``qtree/rest`` in ``view``, one component at a time; a symlink on the way is
    never followed (I10)."""
    ino = view.qtree_root(qtree)
    if ino is None:
        raise BackendError(
            f"no qtree {qtree!r} in {label}",
            hint=f"qtrees there: {', '.join(view.qtrees()) or 'none'}",
        )
    rec = view.existing(ino)
    done = qtree
    for part in filter(None, rest.split("/")):
        if rec.kind != DIR:
            kind = "a symlink (never followed)" if rec.kind == LNK else "a file"
            raise BackendError(f"{done!r} is {kind} in {label}", hint="name a path below a directory")
        child = view.dir(rec).get(part)
        crec = view.inode(child) if child is not None else None
        done = f"{done}/{part}"
        if child is None or crec is None:
            raise BackendError(f"no {done!r} in {label}", hint=f"`coalesce sim ls` lists {done.rsplit('/', 1)[0]!r}")
        ino, rec = child, crec
    return ino, rec


KINDS = {DIR: "d", REG: "f", LNK: "l"}


def entries(view: View, rec: Inode) -> Iterator[tuple[str, int, Inode]]:
    """(name, inode, record) of a directory's entries in name order."""
    for name, ino in sorted(view.dir(rec).items()):
        crec = view.inode(ino)
        if crec is not None and crec.kind in KINDS:
            yield name, ino, crec
