"""The cost model: measured runs and a price table in, dollars and projections out (docs/cost.md)."""
