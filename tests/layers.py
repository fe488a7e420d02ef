"""An import-linter contract for DESIGN's layer table ("The code's layers").

import-linter's own `layers` contract takes whole packages, but Sluice's layers cut across
apps (apps/runs/models is layer 3, apps/runs/engine 5, apps/runs/views 7), and it passes
over modules no layer names. This contract maps every module of the root packages to a
layer by the first rule whose pattern matches it (`*` is one dotted segment; a pattern
covers the module and everything below it, one with a leading `=` the module alone). It
refuses a module no rule covers, an import (direct, including those inside functions) from
a lower layer into a higher one, and any circle: modules of one layer may import each other,
but a module that can reach itself through its imports breaks the contract too
(import-linter's `acyclic_siblings` works on packages, and Sluice's layers make
package-level loops such as graphs.views -> runs -> graphs.models harmless).
"""

import re
from dataclasses import dataclass

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


@dataclass(frozen=True)
class Rule:
    layer: int
    pattern: str

    def matches(self, module: str) -> bool:
        exact = self.pattern.startswith("=")  # "=apps": that module only, not its children
        parts = self.pattern.removeprefix("=").split(".")
        segments = (r"[^.]+" if s == "*" else re.escape(s) for s in parts)
        below = "" if exact else r"(\..+)?"
        return re.fullmatch(r"\.".join(segments) + below, module) is not None


def parse_rules(lines: list[str]) -> list[Rule]:
    rules = []
    for line in lines:
        layer, _, patterns = line.partition(":")
        rules += [Rule(int(layer), p) for p in patterns.split()]
    return rules


def layer_of(module: str, rules: list[Rule]) -> int | None:
    return next((rule.layer for rule in rules if rule.matches(module)), None)


def violations(
    imports: list[tuple[str, str]], modules: set[str], rules: list[Rule]
) -> tuple[list[str], list[str]]:
    """(modules no rule covers, imports that go up a layer), as readable lines."""
    layers = {module: layer_of(module, rules) for module in modules}
    unmapped = sorted(m for m, layer in layers.items() if layer is None)
    upward = []
    for importer, imported in sorted(imports):
        low, high = layers.get(importer), layers.get(imported)
        if low is not None and high is not None and high > low:
            upward.append(f"{importer} (layer {low}) imports {imported} (layer {high})")
    return unmapped, upward


class LayerTableContract(Contract):
    type_name = "layer_table"

    # Lines of "LAYER: pattern pattern ...", most specific first.
    rules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        rules = parse_rules(list(self.rules))  # type: ignore[call-overload]
        modules = set(graph.modules)
        imports = [
            (importer, imported)
            for importer in modules
            for imported in graph.find_modules_directly_imported_by(importer)
            if imported in modules
        ]
        unmapped, upward = violations(imports, modules, rules)
        circles = circles_in(graph, imports)
        return ContractCheck(
            kept=not (unmapped or upward or circles),
            metadata={"unmapped": unmapped, "upward": upward, "circles": circles},
        )

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module in check.metadata["unmapped"]:
            output.print_error(f"{module}: no layer in the table covers it")
        for line in check.metadata["upward"]:
            output.print_error(line)
        for line in check.metadata["circles"]:
            output.print_error(f"import circle: {line}")


def circles_in(graph: grimp.ImportGraph, imports: list[tuple[str, str]]) -> list[str]:
    """One line per import that closes a circle: importer -> imported -> ... -> importer."""
    found = []
    for importer, imported in sorted(imports):
        back = graph.find_shortest_chain(importer=imported, imported=importer)
        if back:
            found.append(" -> ".join((importer, *back)))
    return found
