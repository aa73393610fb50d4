"""lmforge's graph IR: types, values, nodes, graphs, the op registry, printing, JSON and verification."""
from lmforge.ir.graph import Graph, GraphBuilder, Node, Value
from lmforge.ir.ops import all_ops, get_op
from lmforge.ir.types import Dim, TensorType
from lmforge.ir.verify import verify

__all__ = ["Dim", "Graph", "GraphBuilder", "Node", "TensorType", "Value", "all_ops", "get_op", "verify"]
