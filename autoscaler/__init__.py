"""Placement autoscaler: policy schema, planner, controller."""
