"""The one rules engine behind every official → MLX name map.

A map is a table of `Rule`s: a source pattern whose `{slot}`s stand for regexes the table
names (block index, `weight|bias`, ...), the target name the same slots fill, and an optional
axis permutation for the tensor. `RuleTable.apply` maps a whole checkpoint and reports, in
one error, every key no rule places (unknown), every parameter nobody fills (missing) and every
parameter filled twice (duplicate). Keys outside the namespaces a map converts can be tolerated:
they are returned as dropped instead of raising, for the caller to warn about and record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mlx_starflow.errors import WeightsError, listing


@dataclass(frozen=True)
class Rule:
    """One source name pattern, the name it becomes, and the axis permutation of its tensor."""

    source: str
    target: str
    permutation: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Mapped:
    """A checkpoint key placed by a rule: where it came from, where it goes, how it is reshaped."""

    key: str
    target: str
    permutation: tuple[int, ...] | None = None

    def target_shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape after the permutation (a tensor of another rank, e.g. a bias, keeps its own)."""
        if self.permutation is None or len(source_shape) != len(self.permutation):
            return tuple(source_shape)
        return tuple(source_shape[axis] for axis in self.permutation)


@dataclass(frozen=True)
class Matched:
    """The result of mapping a checkpoint: each target's source, and the keys dropped as foreign."""

    mapped: dict[str, Mapped]
    dropped: tuple[str, ...] = ()

    def keys(self) -> dict[str, str]:
        """{target: checkpoint key}."""
        return {target: m.key for target, m in self.mapped.items()}


def _compile(pattern: str, slots: Mapping[str, str]) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(f"(?P<{piece}>{slots[piece]})" if n % 2 else re.escape(piece) for n, piece in enumerate(pieces))
    return re.compile(regex + r"\Z")


class RuleTable:
    """An ordered table of rules over named slots; the first rule that matches a name wins.

    Missing weights are reported by their source names (what the user's checkpoint lacks) unless
    `one_to_one` is False, when several sources may fill one target and only its name is exact.
    """

    def __init__(self, rules: Iterable[Rule], slots: Mapping[str, str], *, one_to_one: bool = True):
        self.rules = tuple(rules)
        self.one_to_one = one_to_one
        self._forward = tuple((_compile(rule.source, slots), rule) for rule in self.rules)
        self._backward = tuple((_compile(rule.target, slots), rule) for rule in self.rules)

    def map_name(self, name: str) -> Mapped | None:
        """Where one source name goes, or None when no rule matches it."""
        for regex, rule in self._forward:
            match = regex.match(name)
            if match:
                return Mapped(name, rule.target.format(**match.groupdict()), rule.permutation)
        return None

    def source_name(self, target: str) -> str:
        """The source name of one target name (the table read backwards), for exporting."""
        for regex, rule in self._backward:
            match = regex.match(target)
            if match:
                return rule.source.format(**match.groupdict())
        raise KeyError(f"{target} has no source name")

    def _source_or_target(self, target: str) -> str:
        try:
            return self.source_name(target)
        except KeyError:
            return target

    def apply(
        self,
        names: Iterable[tuple[str, str]],
        expected: Iterable[str],
        *,
        what: str,
        fix: str,
        ignore: Callable[[str], bool] = lambda name: False,
        ignore_targets: tuple[str, ...] = (),
        namespaces: tuple[str, ...] | None = None,
    ) -> Matched:
        """Map `(name the rules see, key in the checkpoint)` pairs onto the `expected` targets.

        `ignore` names are skipped silently (buffers a model registers but never reads), as are
        targets under `ignore_targets`. With `namespaces`, a name outside all of them that no
        rule places is dropped and returned instead of being an error. Any other unplaced name,
        a target filled twice or an expected target left empty is a `WeightsError` that lists
        them all, begins with `what` and ends with `fix`.
        """
        expected = set(expected)
        mapped: dict[str, Mapped] = {}
        unknown: list[str] = []
        duplicated: list[str] = []
        dropped: list[str] = []
        for name, key in names:
            if ignore(name):
                continue
            found = self.map_name(name)
            if found is not None and found.target not in expected and found.target.startswith(ignore_targets):
                continue
            if found is None or found.target not in expected:
                if namespaces is not None and found is None and not name.startswith(namespaces):
                    dropped.append(key)
                else:
                    unknown.append(key)
            elif found.target in mapped:
                duplicated.append(f"{mapped[found.target].key} and {key}")
            else:
                mapped[found.target] = Mapped(key, found.target, found.permutation)
        missing = sorted(expected - set(mapped))
        if self.one_to_one:
            missing = sorted(self._source_or_target(target) for target in missing)
        if unknown or missing or duplicated:
            problems = [
                f"unknown keys {listing(sorted(unknown))}" if unknown else "",
                f"missing {'keys' if self.one_to_one else 'weights'} {listing(missing)}" if missing else "",
                f"the same weight given twice: {listing(duplicated)}" if duplicated else "",
            ]
            raise WeightsError(f"{what}: " + "; ".join(p for p in problems if p) + f"; {fix}")
        return Matched(mapped, tuple(dropped))


def prefixes(keys: Iterable[str], depth: int = 1) -> list[str]:
    """The distinct leading `depth` dotted parts of `keys`, sorted: a short summary for a message."""
    return sorted({".".join(key.split(".")[:depth]) for key in keys})
