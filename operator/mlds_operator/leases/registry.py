"""The campaigns a lease server serves, and opening one: the same steps in the operator and in `mlds run`.

:class:`Campaigns` is what the lease HTTP server (:mod:`mlds_operator.leases.http`) and the metrics
(:mod:`mlds_operator.leases.metrics`) look campaigns up in; the controller
(:mod:`mlds_operator.controller.sync`) and ``mlds run`` (:mod:`mlds_operator.run.runner`) fill it through
:func:`open_campaign`: open the campaign's store, open its :class:`CampaignService` (which resumes from
the store's checkpoint and the results after it), give it its metrics, and serve it. Neither caller
needs the HTTP module for that.

A finished campaign that is not open (the operator restarted after it ended, and does not reopen it:
that would re-read every result for nothing) can still be *known* to the registry by its token
(:meth:`Campaigns.add_finished`): its workers, still asking for work, then hear ``finished`` and exit 0
instead of getting 401 and exiting as unauthorised, which would fail their pods and Jobs for nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from mlds_contract.campaign import CampaignSpec
from mlds_contract.errors import MldsError

from mlds_operator.leases.metrics import instrument
from mlds_operator.leases.service import CampaignService, ServiceSettings, bearer_matches
from mlds_operator.storage.store import open_store

__all__ = ["Campaigns", "open_campaign"]

log = logging.getLogger(__name__)


class Campaigns:
    """The campaigns a server serves, by (namespace, name)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], CampaignService] = {}
        self._finished: dict[tuple[str, str], str] = {}  # finished campaigns not served: their tokens

    def add(self, namespace: str, name: str, service: CampaignService) -> None:
        self._finished.pop((namespace, name), None)
        self._by_key[(namespace, name)] = service

    def add_finished(self, namespace: str, name: str, token: str) -> None:
        """Know a finished campaign that is not served: its workers are told it is finished (see above)."""
        if (namespace, name) not in self._by_key:
            self._finished[(namespace, name)] = token

    def remove(self, namespace: str, name: str) -> CampaignService | None:
        self._finished.pop((namespace, name), None)
        return self._by_key.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> CampaignService | None:
        return self._by_key.get((namespace, name))

    def finished(self, namespace: str, name: str, authorization: str | None) -> bool:
        """Is this a finished campaign known by its token only, and does ``authorization`` carry that token?"""
        token = self._finished.get((namespace, name))
        return token is not None and bearer_matches(authorization, token)

    def items(self) -> list[tuple[tuple[str, str], CampaignService]]:
        return list(self._by_key.items())

    async def checkpoint_leases(self) -> None:
        """Each served campaign checkpoints its recent grants if due (:meth:`CampaignService.checkpoint_leases`).

        For a server whose ticks come less often than ``grant_checkpoint_seconds`` (the operator's follow
        its status interval). A storage outage is logged; the next call tries again.
        """
        for key, service in self.items():
            if self._by_key.get(key) is not service:
                continue  # no longer served (closed while an earlier campaign wrote): its store may be closed
            try:
                await service.checkpoint_leases()
            except MldsError as exc:
                log.warning("campaign=%s/%s lease checkpoint failed (retried): %s", key[0], key[1], exc)


async def open_campaign(
    campaigns: Campaigns,
    namespace: str,
    name: str,
    spec: CampaignSpec,
    *,
    token: str,
    access_key: str | None = None,
    secret_key: str | None = None,
    local_root: Path | None = None,
    upload_base_url: str | None = None,
    upload_secret: bytes | None = None,
    pools: list[str] | None = None,
    accelerators: Mapping[str, str] | None = None,
    settings: ServiceSettings | None = None,
) -> CampaignService:
    """Open a campaign's store and lease service, instrument it and serve it in ``campaigns``.

    The store is ``spec.storage`` (S3, with these credentials or the ``AWS_*`` environment) or, without
    one, a folder at ``local_root`` whose upload URLs point at ``upload_base_url`` and are signed with
    ``upload_secret`` (see :func:`~mlds_operator.storage.store.open_store`). ``pools`` and
    ``accelerators`` default to the spec's. Raises :class:`~mlds_contract.errors.UserError` (a
    configuration the store refuses) or :class:`~mlds_contract.errors.StorageUnavailable` (an outage);
    the store is closed then, and nothing is served.
    """
    store = await asyncio.to_thread(
        open_store,
        spec.storage,
        local_root=local_root,
        access_key=access_key,
        secret_key=secret_key,
        upload_base_url=upload_base_url,
        upload_secret=upload_secret,
    )
    try:
        service = await CampaignService.open(name, spec, store, token=token, pools=pools, settings=settings)
    except BaseException:
        store.close()
        raise
    instrument(service, namespace, accelerators)
    campaigns.add(namespace, name, service)
    return service
