"""Opening a campaign to serve it: one function for the operator's controller and for `mlds run`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from mlds_contract.errors import UserError
from mlds_contract.lease import LeaseGrant, LeaseRequest
from mlds_operator.leases.metrics import CampaignMetrics
from mlds_operator.leases.registry import Campaigns, open_campaign
from mlds_operator.leases.service import ServiceSettings
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import LocalStore

from tests.api_fixtures import NAME, NAMESPACE, POOL, TOKEN, a_campaign


async def test_an_opened_campaign_is_served_instrumented_and_signs_uploads_with_the_given_secret(
    tmp_path: Path,
) -> None:
    campaigns = Campaigns()
    service = await open_campaign(
        campaigns,
        NAMESPACE,
        NAME,
        a_campaign(networks=4),
        token=TOKEN,
        local_root=tmp_path / "store",
        upload_base_url="http://127.0.0.1:9",
        upload_secret=b"k" * 32,
    )

    assert campaigns.get(NAMESPACE, NAME) is service
    assert isinstance(service.observer, CampaignMetrics)
    assert service.observer.accelerator(POOL) == "cpu"  # the spec's pools by default
    assert service.authorized(f"Bearer {TOKEN}")
    store = service.store
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "store").absolute()
    # Signed with the given secret: a store over the same folder and secret accepts the URL (mlds run's restart).
    url = store.presign_put("_mlds/staging/0/0-w/meta.json", timedelta(minutes=1))
    path, _, query = url.removeprefix("http://127.0.0.1:9/v1/objects/").partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    again = LocalStore(tmp_path / "store", secret=b"k" * 32)
    assert again.check_upload(path, params["expires"], params["sig"])


async def test_a_store_that_cannot_be_opened_serves_nothing(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the results folder should be")
    campaigns = Campaigns()

    with pytest.raises(UserError, match="cannot create the store folder"):
        await open_campaign(campaigns, NAMESPACE, NAME, a_campaign(), token=TOKEN, local_root=not_a_folder)

    assert campaigns.items() == []


async def test_served_campaigns_checkpoint_their_fresh_leases_and_closed_ones_write_nothing(tmp_path: Path) -> None:
    # The operator's ticks follow its status interval; this pass, every second, checkpoints fresh grants.
    campaigns = Campaigns()
    settings = ServiceSettings(grant_checkpoint_seconds=0.0)
    served, closed = [
        await open_campaign(
            campaigns,
            NAMESPACE,
            name,
            a_campaign(networks=4),
            token=TOKEN,
            local_root=tmp_path / name,
            upload_base_url="http://127.0.0.1:9",
            settings=settings,
        )
        for name in ("served", "closed")
    ]
    request = LeaseRequest(worker="w", pool=POOL, accelerator="cpu", device_name="cpu", max_units=1)
    for service in (served, closed):
        assert isinstance(await service.grant(request), LeaseGrant)
    campaigns.remove(NAMESPACE, "closed")

    await campaigns.checkpoint_leases()

    assert mf.get_checkpoint(served.store) is not None
    assert mf.get_checkpoint(closed.store) is None
    assert not await served.checkpoint_leases()  # written: nothing granted since
