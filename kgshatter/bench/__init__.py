"""Benchmarks (``kgshatter benchmark``, ``edit-benchmark``, ``pretrained-benchmark``,
``rome-benchmark``): they print numbers and write JSON; they are not part of the library's data
flow and nothing in it imports them.
"""
