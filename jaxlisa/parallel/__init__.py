"""Device mesh and logical-axis sharding."""

from jaxlisa.parallel.mesh import (BATCH_AXES, MESH_AXES, axis_rules, batch_sharding, describe, logical_shardings,
                                   make_mesh, mesh_shape, num_batch_shards, replicated, use)  # noqa: F401
from jaxlisa.parallel import distributed  # noqa: F401,E402
from jaxlisa.parallel.distributed import is_primary  # noqa: F401,E402
