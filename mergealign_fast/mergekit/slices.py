"""A mergekit config's `slices`, read the way mergekit reads them: with passthrough a stack of
layer ranges, one model each; with any other method, merged slice by slice — every slice the
same models in the same order, each source with its `layer_range` and `parameters`
(plan/slices.py plans both)."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .. import methods
from ..errors import PlanError
from ..methods.core.parameters import Method
from ..plan.slices import MergedSlice, SliceSource
from .loaded import RunConfig


class SliceReader:
    """The `slices` part of the config reader (mergekit/config.py): it reports through
    self.problem, and builds the RunConfig through the reader's _finished and RunConfig."""

    def _sliced_config(self) -> RunConfig:
        """`slices` merged slice by slice (slices.plan_sliced_merge): each output layer is the
        merge of one layer of each source, as mergekit plans it.  Every slice lists the same
        models in the same order (their layer ranges may differ), base_model among them."""
        name = self._method_name()
        base = self._base()
        parsed = self._merged_slices(self.raw.get("slices"))
        if not parsed:
            raise PlanError(list(dict.fromkeys(self.read_past + self.problems)))
        first = [source.folder.resolve() for source, _ in parsed[0][0]]
        for i, (sources, _) in enumerate(parsed[1:], 1):
            if [source.folder.resolve() for source, _ in sources] != first:
                self.problem(f"slices[{i}]: every slice must merge the same models in the same "
                             "order as slices[0] (other models per slice are not supported)")
        if base is not None and base.resolve() not in first:
            self.problem(f"base_model {base}: with slices it must be one of each slice's "
                         "sources (its layer range is the slice's)")
        models = [(source.folder, {}) for source, _ in parsed[0][0]]
        roles = self._roles(name, base, models) if methods.is_method(name) else None
        rules, merged = [], []
        for sources, slice_parameters in parsed if roles is not None else ():
            with_parameters = [(source.folder, parameters) for source, parameters in sources]
            levels = [slice_parameters, self.raw.get("parameters")]
            rules_here = self._method_rules(name, roles, with_parameters, levels)
            self._check_weights(name, roles, with_parameters, levels)
            ranges = {source.folder.resolve(): (source.start, source.end) for source, _ in sources}
            merged.append(MergedSlice(tuple((role, *ranges[folder.resolve()])
                                            for role, folder in roles.items()),
                                      Method(name, vectors=self._vectors(name),
                                             rules=tuple(rules_here))))
            rules += rules_here
        names = tuple(dict.fromkeys(source.name for source, _ in parsed[0][0]))
        return self._finished(name, roles, base, list(dict.fromkeys(rules)), names,
                              tuple(merged))

    def _merged_slices(self, raw) -> List[Tuple[List[Tuple[SliceSource, dict]], dict]]:
        """[(sources with their `parameters`, the slice's `parameters`)] of each slice."""
        if not isinstance(raw, list) or not raw:
            self.problem("`slices` must be a non-empty list")
            return []
        parsed = []
        for i, item in enumerate(raw):
            if isinstance(item, dict) and "merge_method" in item:
                self.problem(f"slices[{i}]: `merge_method` inside a slice: mergekit 0.1.5 "
                             "ignores it and merges every slice with the top-level "
                             "merge_method, so the merge would not be the one written; give "
                             "one top-level merge_method (or merge each slice separately)")
                continue
            if not isinstance(item, dict) or set(item) - {"sources", "parameters"} \
                    or not isinstance(item.get("sources"), list) or not item["sources"]:
                self.problem(f"slices[{i}]: a slice takes `sources` (a non-empty list) and "
                             f"optional `parameters` (got {item!r})")
                continue
            sources = [self._slice_source(f"slices[{i}]", s, ("model", "layer_range",
                                                              "parameters"))
                       for s in item["sources"]]
            if None in sources:
                continue
            if len({s.end - s.start for s in sources}) > 1:
                self.problem(f"slices[{i}]: every source must hold the same number of layers "
                             f"(got {', '.join(f'{s.name} {s.end - s.start}' for s in sources)})")
                continue
            parsed.append(([(s, dict(raw_s.get("parameters") or {}))
                            for s, raw_s in zip(sources, item["sources"])],
                           item.get("parameters") or {}))
        return parsed

    def _stack_config(self) -> RunConfig:
        """`slices` with passthrough: a stack of layer ranges (slices.py)."""
        stack = self._slices(self.raw.get("slices"))
        base_name = self.raw.get("base_model")
        donor = self._reference(base_name, "base_model") if base_name is not None \
            else (stack[0].folder if stack else None)
        self._slices_vocabulary_problem()
        if self.raw.get("parameters"):
            self.problem("`parameters` with passthrough slices (e.g. scale) are not supported")
        if not self.allow_crimes:
            self._check_architectures({s.name: s.folder for s in stack})
        out_dtype = self._out_dtype()
        if self.problems:
            raise PlanError(self.read_past + self.problems)
        return RunConfig(donor, donor, donor, Method(), out_dtype, "base", tuple(self.read_past),
                         tuple(dict.fromkeys(self.warnings)), str(base_name or ""),
                         tuple(dict.fromkeys(s.name for s in stack)),
                         self.raw.get("chat_template"), tuple(stack))

    def _slices(self, raw) -> List[SliceSource]:
        """The passthrough stack: one source per slice."""
        if not isinstance(raw, list) or not raw:
            self.problem("`slices` must be a non-empty list")
            return []
        stack = []
        for i, item in enumerate(raw):
            sources = item.get("sources") if isinstance(item, dict) else None
            if not isinstance(sources, list) or len(sources) != 1:
                self.problem(f"slices[{i}]: passthrough takes exactly one entry under "
                             "`sources` (several are merged: give a merge_method)")
                continue
            source = self._slice_source(f"slices[{i}]", sources[0], ("model", "layer_range"))
            if source is not None:
                stack.append(source)
        return stack

    def _slice_source(self, where: str, source, keys: Tuple[str, ...]
                      ) -> Optional[SliceSource]:
        if not isinstance(source, dict) or set(source) - set(keys):
            self.problem(f"{where}: a source takes {', '.join(f'`{k}`' for k in keys)} (got "
                         f"{source!r})")
            return None
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1]):
            self.problem(f"{where}: layer_range must be [first, end) with 0 <= first < end "
                         f"(got {span!r})")
            return None
        folder = self._reference(source.get("model"), where)
        return SliceSource(str(source["model"]), folder, span[0], span[1]) if folder else None
