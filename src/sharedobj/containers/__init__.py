"""Shared containers built on heap blocks: dict, list, queues and synchronisation objects.

Each lives in its own module; ``SharedMemoryManager`` exposes them as
``smm.dict()``, ``smm.list()``, ``smm.Queue()``, ``smm.Lock()`` and so on, the
names ``multiprocessing.Manager()`` uses.
"""
