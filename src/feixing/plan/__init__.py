"""Planning: the context-parallel cost model and the automatic layout choice."""
