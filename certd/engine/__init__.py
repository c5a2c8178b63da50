"""The use cases, over an explicit :class:`~certd.engine.ports.Ports` value.

Where to read: :mod:`~certd.engine.renew` (decide, order, store, roll out),
:mod:`~certd.engine.rollback`, :mod:`~certd.engine.revoke` (and :mod:`~certd.engine.compromise`),
:mod:`~certd.engine.recover`, :mod:`~certd.engine.redeploy`, :mod:`~certd.engine.status`; what
they share, :mod:`~certd.engine.rotations` (drive a journal, record how it ended) and
:mod:`~certd.engine.planning` (the facts behind every decision); their vocabulary,
:mod:`~certd.engine.outcome` (RenewRequest, Outcome, Result) and :mod:`~certd.engine.lifecycle`
(a version's VersionStatus). :class:`~certd.engine.manager.Manager` is the facade the daemon
and the CLI call.
"""
