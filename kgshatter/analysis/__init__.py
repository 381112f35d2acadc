"""Entity representations and the geometry of the rings they form."""
