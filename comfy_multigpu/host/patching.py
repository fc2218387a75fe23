"""The one place that changes the host: loads patches/manifest.toml, checks shapes, applies, reverts.

Every patch names a target "module:attr.path", a factory "comfy_multigpu.x:make_y" called as
factory(original, pool), the host shape it requires (an inspect.signature string and/or attribute
names) and why it exists. Originals are read with vars(owner)[name], never getattr on a class, and
kept in one registry so that revert() puts the identical objects back.
Run `python -m comfy_multigpu.host.patching` to print docs/patches.md.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

MANIFEST = Path(__file__).resolve().parent.parent / "patches" / "manifest.toml"


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
    kind: str = "attr"                 # "attr": replace the attribute; "class": swap obj.__class__
    signature: Optional[str] = None    # str(inspect.signature(original)) this patch was written for
    requires_attrs: tuple[str, ...] = ()
    optional: bool = False             # the target module may not be loaded (skipped then)

    @property
    def module_name(self) -> str:
        return self.target.split(":", 1)[0]


@dataclass
class Applied:
    spec: PatchSpec
    owner: Any
    attr: str
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
        specs.append(PatchSpec(**entry))
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


class PatchSet:
    """Applies a manifest's patches all or nothing, keeps originals, reverts them exactly."""

    def __init__(self, specs: list[PatchSpec], pool, modules: Optional[Mapping[str, Any]] = None):
        self.specs = specs
        self.pool = pool
        self.modules = modules if modules is not None else sys.modules
        self.applied: list[Applied] = []

    # ---- resolution and guards -------------------------------------------------------------
    def _module(self, spec: PatchSpec):
        module = self.modules.get(spec.module_name)
        if module is None and not spec.optional and spec.module_name != "__main__":
            module = importlib.import_module(spec.module_name)
        return module

    def resolve(self, spec: PatchSpec) -> Optional[tuple[Any, str, Any]]:
        """(owner, attribute, original) for a spec, None for an absent optional module."""
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
                setattr(owner, attr, replacement)
                done.append(Applied(spec, owner, attr, original, replacement))
        except BaseException:
            for a in reversed(done):
                setattr(a.owner, a.attr, a.original)
            raise
        self.applied.extend(done)
        return [a.spec.id for a in done]

    def revert(self) -> list[str]:
        reverted = []
        for a in reversed(self.applied):
            setattr(a.owner, a.attr, a.original)
            reverted.append(a.spec.id)
        self.applied.clear()
        return reverted

    @staticmethod
    def current(a: Applied) -> Any:
        return type(a.owner) if a.attr == "__class__" else vars(a.owner).get(a.attr)

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
        "| id | target | kind | requires | why | evidence |",
        "|---|---|---|---|---|---|",
    ]
    for s in specs:
        requires = s.signature or ""
        if s.requires_attrs:
            requires = (requires + " " if requires else "") + "attrs: " + ", ".join(s.requires_attrs)
        opt = " (optional)" if s.optional else ""
        lines.append(f"| `{s.id}` | `{s.target}`{opt} | {s.kind} | `{requires}` | {s.why} | {s.evidence} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
