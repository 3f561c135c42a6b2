"""Copy of an FX graph to restore when a rewrite (or compiling it) fails.

Dynamo attaches attributes to nodes (``_dynamo_source`` on placeholders) that
AOTAutograd reads; ``Graph.graph_copy`` does not carry them, so they are copied
here too. ``meta`` dicts are shallow-copied, as ``graph_copy`` does.
"""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node

__all__ = ["ModuleSnapshot", "graph_modules", "restore", "snapshot"]


def snapshot(graph: Graph) -> Graph:
    copy = Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    value_map: dict[Node, Node] = {}
    out = copy.graph_copy(graph, value_map)
    copy.output(out)
    copy._codegen = graph._codegen
    for old, new in value_map.items():
        for key, value in vars(old).items():
            if key not in vars(new):
                setattr(new, key, value)
    return copy


def restore(gm: GraphModule, graph: Graph) -> None:
    gm.graph = graph
    gm.recompile()


def graph_modules(gm: GraphModule) -> list[tuple[str, GraphModule]]:
    """``gm`` and the graphs it calls through higher-order ops (e.g. activation-checkpoint bodies)."""
    return [(name, sub) for name, sub in gm.named_modules() if isinstance(sub, GraphModule)]


class ModuleSnapshot:
    """Copies of the graphs of ``gm`` and of every subgraph module, to restore together."""

    def __init__(self, gm: GraphModule) -> None:
        self.graphs = {name: snapshot(sub.graph) for name, sub in graph_modules(gm)}

    def restore(self, gm: GraphModule) -> None:
        for name, sub in graph_modules(gm):
            if name in self.graphs:
                restore(sub, self.graphs[name])
