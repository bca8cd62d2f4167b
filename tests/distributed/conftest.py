"""The shared spawned worlds: every job registered with tests.distributed.world.rank_job runs once per world size."""

import pytest

from tests.distributed.world import registered_jobs, run_world_or_fail


@pytest.fixture(scope="package", params=[2, 4], ids=["world2", "world4"])
def world(request):
    """``(world_size, [results per rank])``, each a dict job name -> what the job returned on that rank."""
    world_size = request.param
    return world_size, run_world_or_fail(world_size, registered_jobs(world_size), deadline_s=150)
