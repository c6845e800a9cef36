"""Scheduling: periodic jobs (one active beat), runtime-editable entries, delayed jobs.

See docs/scheduling.md. The schedule itself is data in tasks/schedule/entries.py.
"""
