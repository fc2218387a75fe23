"""The one place that changes the host: loads patches/manifest.toml, checks shapes, applies, reverts.

Every patch names a target ("module:attr.path", or "signal:SIGNAME" for a process signal handler), a
factory "comfy_multigpu.x:make_y" called as factory(original, pool), the host shape it requires (an
inspect.signature string and/or attribute names) and why it exists. Originals are read with
vars(owner)[name] (never getattr on a class), type(obj) or signal.getsignal, and kept in one registry
so that revert() puts the identical objects back, but only where our replacement is still in place:
a target something else replaced since is left as it is (one WARNING line).
Run `python -m comfy_multigpu.host.patching` to print docs/patches.md.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

MANIFEST = Path(__file__).resolve().parents[2] / "patches" / "manifest.toml"   # repo root
KINDS = ("attr", "class", "signal")

logger = logging.getLogger("comfy_multigpu")


class HostMismatch(RuntimeError):
    """The running ComfyUI does not have the shape a patch needs; the message says which and what to do."""


@dataclass(frozen=True)
class HostSpec:
    name: str
    min_version: str
    below_version: str
    commit: str


@dataclass(frozen=True)
class PatchSpec:
    id: str
    target: str
    factory: str
    why: str
    evidence: str
    kind: str = "attr"                 # "attr": replace the attribute; "class": swap obj.__class__;
                                       # "signal": install a handler ("signal:SIGTERM"), main thread only
    signature: Optional[str] = None    # str(inspect.signature(original)) this patch was written for
    requires_attrs: tuple[str, ...] = ()
    optional: bool = False             # the target module may not be loaded (skipped then)
    isolation: bool = False            # makes per-process state per worker (tests/test_isolation.py
                                       # leaves these out to show the defect they prevent)
    process_child: bool = False        # applied inside a process worker's child too (host/child_hooks.py)

    @property
    def module_name(self) -> str:
        return self.target.split(":", 1)[0]


@dataclass
class Applied:
    spec: PatchSpec
    owner: Any          # kind attr: the object holding attr; class: the instance; signal: the signal module
    attr: str           # kind attr: the attribute name; class: "__class__"; signal: the signal name
    original: Any
    replacement: Any


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def load_manifest(path: Path = MANIFEST) -> tuple[HostSpec, list[PatchSpec]]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    host = HostSpec(**data["host"])
    specs = []
    for entry in data["patch"]:
        entry = dict(entry)
        entry["requires_attrs"] = tuple(entry.get("requires_attrs", ()))
        spec = PatchSpec(**entry)
        if spec.kind not in KINDS:
            raise ValueError(f"{path}: patch {spec.id} has kind {spec.kind!r}; expected one of {', '.join(KINDS)}")
        specs.append(spec)
    ids = [s.id for s in specs]
    if len(ids) != len(set(ids)):
        raise ValueError(f"duplicate patch ids in {path}")
    return host, specs


def check_host_version(host: HostSpec, version: str) -> Optional[str]:
    """None when `version` is within the supported range, else the reason."""
    v = _version_tuple(version)
    if _version_tuple(host.min_version) <= v < _version_tuple(host.below_version):
        return None
    return (f"{host.name} {version} is outside the supported range "
            f">={host.min_version},<{host.below_version} (pinned commit {host.commit[:7]})")


def _import_attr(path: str):
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _unwrap(obj):
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _read(kind: str, owner: Any, attr: str) -> Any:
    """What the target holds now (None for an attribute that is gone)."""
    if kind == "class":
        return type(owner)
    if kind == "signal":
        return owner.getsignal(getattr(owner, attr))
    return vars(owner).get(attr)


def _write(kind: str, owner: Any, attr: str, value: Any) -> None:
    """The only place that changes the host."""
    if kind == "signal":
        owner.signal(getattr(owner, attr), value)
    else:
        setattr(owner, attr, value)     # attr is "__class__" for kind "class"


class PatchSet:
    """Applies a manifest's patches all or nothing, keeps originals, reverts them exactly.

    A "signal" patch must be applied and reverted in the main thread (a rule of the signal module);
    check() refuses it elsewhere.
    """

    def __init__(self, specs: list[PatchSpec], pool, modules: Optional[Mapping[str, Any]] = None):
        self.specs = specs
        self.pool = pool
        self.modules = modules if modules is not None else sys.modules
        self.applied: list[Applied] = []
        self.kept_foreign: list[str] = []   # ids the last revert()/rollback left alone (target replaced since)

    # ---- resolution and guards -------------------------------------------------------------
    def _module(self, spec: PatchSpec):
        module = self.modules.get(spec.module_name)
        if module is None and not spec.optional and spec.module_name != "__main__":
            module = importlib.import_module(spec.module_name)
        return module

    def resolve(self, spec: PatchSpec) -> Optional[tuple[Any, str, Any]]:
        """(owner, attribute, what the target holds now) for a spec, None for an absent optional module.
        Kind "class": (the instance, "__class__", its type); "signal": (the signal module, "SIGTERM", handler)."""
        module = self._module(spec)
        if module is None:
            if spec.optional:
                return None
            raise HostMismatch(f"patch {spec.id}: module {spec.module_name} is not loaded")
        path = spec.target.split(":", 1)[1].split(".")
        owner = module
        for part in path[:-1]:
            try:
                owner = getattr(owner, part)
            except AttributeError:
                raise HostMismatch(f"patch {spec.id}: {spec.target} not found ({part!r} missing)") from None
        name = path[-1]
        if spec.kind == "signal":
            if not isinstance(getattr(owner, name, None), int) or not hasattr(owner, "getsignal"):
                raise HostMismatch(f"patch {spec.id}: {spec.target} is not a signal of this platform")
            original = _read("signal", owner, name)
            if original is None:
                raise HostMismatch(f"patch {spec.id}: the {name} handler was not installed from Python, so it "
                                   f"could not be put back; leave {name} alone or drop this patch")
            return owner, name, original
        if spec.kind == "class":
            try:
                obj = getattr(owner, name)
            except AttributeError:
                raise HostMismatch(f"patch {spec.id}: {spec.target} not found") from None
            return obj, "__class__", type(obj)
        try:
            original = vars(owner)[name]
        except (KeyError, TypeError):
            raise HostMismatch(f"patch {spec.id}: {spec.target} is not an attribute of its owner") from None
        return owner, name, original

    def check(self, spec: PatchSpec, owner: Any, original: Any) -> None:
        if spec.kind == "signal" and threading.current_thread() is not threading.main_thread():
            raise HostMismatch(f"patch {spec.id}: {spec.target} can only be installed from the main thread, "
                               f"not {threading.current_thread().name}; activate from the main thread")
        if spec.signature is not None:
            try:
                found = str(inspect.signature(_unwrap(original)))
            except (TypeError, ValueError):
                found = f"<{type(original).__name__}, no signature>"
            if found != spec.signature:
                raise HostMismatch(f"patch {spec.id}: {spec.target} has signature {found}, "
                                   f"expected {spec.signature} ({spec.evidence})")
        subject = owner if spec.kind == "class" else original   # a class swap needs the instance's attrs
        missing = [a for a in spec.requires_attrs if not hasattr(subject, a)]
        if missing:
            raise HostMismatch(f"patch {spec.id}: {spec.target} lacks {', '.join(missing)} ({spec.evidence})")

    def problems(self) -> list[str]:
        """Every guard failure, without changing anything (for a single clear refusal line)."""
        found = []
        for spec in self.specs:
            try:
                resolved = self.resolve(spec)
                if resolved is not None:
                    self.check(spec, resolved[0], resolved[2])
            except HostMismatch as ex:
                found.append(str(ex))
        return found

    # ---- apply / revert --------------------------------------------------------------------
    def _is_applied(self, spec: PatchSpec) -> bool:
        return any(a.spec.id == spec.id for a in self.applied)

    def apply(self) -> list[str]:
        """Apply every patch not yet applied; all or nothing. Returns the ids applied by this call."""
        plan = []
        for spec in self.specs:
            if self._is_applied(spec):
                continue
            resolved = self.resolve(spec)
            if resolved is None:
                continue
            owner, attr, original = resolved
            self.check(spec, owner, original)
            plan.append((spec, owner, attr, original))
        done: list[Applied] = []
        try:
            for spec, owner, attr, original in plan:
                replacement = _import_attr(spec.factory)(original, self.pool)
                _write(spec.kind, owner, attr, replacement)
                done.append(Applied(spec, owner, attr, original, replacement))
        except BaseException:
            self.kept_foreign = []
            for a in reversed(done):
                self._restore(a)
            raise
        self.applied.extend(done)
        return [a.spec.id for a in done]

    def revert(self) -> list[str]:
        """Put the originals back, last applied first, and forget every record.

        Returns the ids restored. A target that no longer holds our replacement (something wrapped or
        replaced it since) is left as it is, with one WARNING line; those ids are in self.kept_foreign
        afterwards (reset by each revert).
        """
        self.kept_foreign = []
        reverted = [a.spec.id for a in reversed(self.applied) if self._restore(a)]
        self.applied.clear()
        return reverted

    def _restore(self, a: Applied) -> bool:
        """The original back if the target still holds our replacement; else keep the newcomer (False)."""
        now = self.current(a)
        if now is not a.replacement:
            logger.warning("comfy-multigpu: revert: patch %s left as it is: %s now holds %r, not our "
                           "replacement (something else replaced it after us)", a.spec.id, a.spec.target, now)
            self.kept_foreign.append(a.spec.id)
            return False
        _write(a.spec.kind, a.owner, a.attr, a.original)
        return True

    @staticmethod
    def current(a: Applied) -> Any:
        return _read(a.spec.kind, a.owner, a.attr)

    def not_in_place(self) -> list[str]:
        """Ids of applied patches whose target no longer holds our replacement."""
        return [a.spec.id for a in self.applied if self.current(a) is not a.replacement]

    def original(self, patch_id: str) -> Any:
        for a in self.applied:
            if a.spec.id == patch_id:
                return a.original
        raise KeyError(patch_id)


def markdown(path: Path = MANIFEST) -> str:
    """docs/patches.md, generated from the manifest (CI fails when the committed copy is stale)."""
    host, specs = load_manifest(path)
    lines = [
        "# Patches applied to ComfyUI",
        "",
        "Generated from `patches/manifest.toml` by `python -m comfy_multigpu.host.patching`; do not edit.",
        f"Host: {host.name} >={host.min_version},<{host.below_version} (pinned commit `{host.commit}`).",
        "",
        "isolation = yes: the patch turns state ComfyUI keeps once per process into state per worker; "
        "tests/test_isolation.py leaves these out to show the defect each one prevents. "
        "child = yes: also applied inside each child process of COMFY_MULTIGPU_WORKER_MODE=process.",
        "",
        "| id | target | kind | isolation | child | requires | why | evidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in specs:
        requires = s.signature or ""
        if s.requires_attrs:
            requires = (requires + " " if requires else "") + "attrs: " + ", ".join(s.requires_attrs)
        opt = " (optional)" if s.optional else ""
        iso = "yes" if s.isolation else ""
        requires = f"`{requires}`" if requires else ""
        child = "yes" if s.process_child else ""
        lines.append(f"| `{s.id}` | `{s.target}`{opt} | {s.kind} | {iso} | {child} | {requires} | {s.why} | "
                     f"{s.evidence} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
