"""Helpers shared by the engine, the methods, the metrics and the analysis code: one model view,
one target resolver, one set of validators, one way to import optional dependencies."""
