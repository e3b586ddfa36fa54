"""taskpg's benchmark suite: ``python -m benchmarks`` (see docs/performance.md).

Modules: ``__main__`` (command line), ``runner`` (runs, statistics, report), ``workloads`` (what is
measured), ``baseline`` (the same SQL cycle from plain psycopg), ``workers`` (worker threads and
processes), ``pg`` (schemas, seeding, server facts), ``targets`` (the issue's targets), ``tasks``
(the task module of the worker processes).
"""
