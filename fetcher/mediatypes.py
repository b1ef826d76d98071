"""Media types of the OCI image spec and Docker image manifest v2 schema 2.

The layer types are the formats' (formats/media_types.py): this module adds the manifest
and config types the registry client negotiates, and names them all in one place for
the network side.
"""

from formats.media_types import DOCKER_LAYER_FOREIGN_GZIP as DOCKER_LAYER_FOREIGN_GZIP
from formats.media_types import DOCKER_LAYER_GZIP as DOCKER_LAYER_GZIP
from formats.media_types import GZIP_LAYERS as GZIP_LAYERS
from formats.media_types import LAYERS as LAYERS
from formats.media_types import OCI_LAYER_GZIP as OCI_LAYER_GZIP
from formats.media_types import OCI_LAYER_NONDIST_GZIP as OCI_LAYER_NONDIST_GZIP
from formats.media_types import OCI_LAYER_NONDIST_TAR as OCI_LAYER_NONDIST_TAR
from formats.media_types import OCI_LAYER_NONDIST_ZSTD as OCI_LAYER_NONDIST_ZSTD
from formats.media_types import OCI_LAYER_TAR as OCI_LAYER_TAR
from formats.media_types import OCI_LAYER_ZSTD as OCI_LAYER_ZSTD
from formats.media_types import TAR_LAYERS as TAR_LAYERS
from formats.media_types import ZSTD_LAYERS as ZSTD_LAYERS

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ALL_MANIFESTS = IMAGE_MANIFESTS | INDEXES

# The Accept header for manifest GETs: preferred kinds first, then anything manifest-like.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
