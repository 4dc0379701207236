"""The graph engine: trace.py reads a model with torch.fx into a GraphPlan of nodes, node_ops.py says what each
node does (evaluate, pull columns, parameter diagonals, residual terms), functional.py maps functional calls
onto module rules, residuals.py forms generic nodes' second-order terms, engine.py sweeps the columns."""
