"""The benchmark images: real Debian packages, a real application, a readiness line.

Each entry is an application people run in containers, chosen to stress a lazy loader
differently: many small Python modules and big shared libraries (python-scipy), a fat
image whose service reads a small share of it (python-fat-api), one large binary
(node-http), a toolchain that opens hundreds of headers (gcc-hello), a
database server (postgres), and the bare base (minbase) for quick runs and smoke tests.
One more, python-torch, is the big image: an ML image whose start maps large shared
libraries (libtorch and what it links); it is run on its own, not in the suite's defaults.
Every application prints a line when it is ready, so a probe that reads the container's
output (`bench.readiness.LogLineProbe` with ``ready_pattern``) times any of them.

Some entries also have later versions (`ImageVersion`), for the startup suite's
new-version scenario: ``v2`` changes the application (an edited constant and a new small
file it reads) over the very same lower layers, ``v3`` also rebuilds the base (one more
package in it), so every layer differs while the paths stay mostly the same.

Usage: ``build(name, cache_dir)`` returns a `rig.images.BuiltImage` (an OCI layout),
building it on first use; ``build_version(name, tag, cache_dir)`` does the same for a
version; `rig.images.push_image` pushes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bench.debian_image import AppFile, DebianImageSpec, build_app_update, build_debian_image
from rig.images import BuiltImage

DEFAULT_CACHE = Path("/var/tmp/acceld-bench/cache")
"""Shared with the startup benchmark: one debootstrap and one build per image per machine."""


FIRST_VERSION = "v1"
"""The tag of an image as its catalog entry describes it; later versions differ from it."""
BASE_UPDATE = ("netbase",)
"""What a v3's rebuilt base adds: a small package of Debian's "important" priority that
minbase leaves out (/etc/services, /etc/protocols), as a base image's next release might."""


@dataclass(frozen=True)
class ImageVersion:
    """A later version of a catalog image: new app files, and perhaps a rebuilt base."""

    tag: str
    app_files: tuple[AppFile, ...]
    base_packages: tuple[str, ...] = ()
    """Non-empty: the base is rebuilt with these, so no layer is shared with v1."""

    @property
    def change(self) -> str:
        """What changed against v1, for tables: the app layer only, or every layer."""
        return "every layer" if self.base_packages else "app layer"


@dataclass(frozen=True)
class BenchImage:
    """A catalog entry: what the image holds and how to tell its application is ready."""

    name: str
    description: str
    spec: DebianImageSpec
    ready_pattern: str
    """Regex that a line of the container's stdout matches once the application is ready."""
    ready_port: int | None = None
    """TCP port a server listens on (host network), for probes that connect instead."""
    versions: tuple[ImageVersion, ...] = ()
    """Later versions (v2, v3) for the new-version scenario; v1 is the entry itself."""


def _edited(script: bytes, old: bytes, new: bytes) -> bytes:
    """``script`` with ``old`` (which must occur exactly once) replaced: a release's edit."""
    if script.count(old) != 1:
        raise ValueError(f"{old!r} occurs {script.count(old)} times")
    return script.replace(old, new)


def _versions(
    main: AppFile, edit: tuple[bytes, bytes], extra: str, contents: tuple[bytes, bytes]
) -> tuple[ImageVersion, ...]:
    """v2 and v3 of an app: ``main`` edited by ``edit`` (to read the new file ``extra``),
    ``extra`` holding ``contents[0]`` in v2 and ``contents[1]`` in v3 (whose base is
    rebuilt, and whose app layer must differ from v2's too)."""
    script = AppFile(main.path, _edited(main.content, *edit), main.mode)
    v2, v3 = (AppFile(extra, content, 0o644) for content in contents)
    return (
        ImageVersion("v2", (script, v2)),
        ImageVersion("v3", (script, v3), BASE_UPDATE),
    )


_PYTHON_APP = b"""\
import numpy
import pandas
import scipy
import scipy.stats

frame = pandas.DataFrame({"x": numpy.arange(10.0)})
print("mean", scipy.stats.tmean(frame["x"]))
print("ready", flush=True)
"""

# The common "one fat base image for every service" case: the image carries the whole
# scientific stack, this service needs numpy and the standard library.
_PYTHON_API_APP = b"""\
import http.server
import json

import numpy

weights = numpy.linspace(0.0, 1.0, 16)


class Score(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"score": float(weights @ weights)}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)


server = http.server.HTTPServer(("127.0.0.1", 8081), Score)
print("ready", flush=True)
server.serve_forever()
"""

# The big image: `import torch` maps libtorch (~130 MB) and the libraries it links
# (opencv, ffmpeg, BLAS, protobuf...), so the start's reads are mostly shared libraries.
_TORCH_APP = b"""\
import torch

x = torch.arange(6.0).reshape(2, 3)
print("sum", float((x @ x.T).sum()))
print("ready", flush=True)
"""

_NODE_APP = b"""\
const http = require("http");
const port = Number(process.env.PORT || 8080);
http
  .createServer((req, res) => res.end("hello from node\\n"))
  .listen(port, () => console.log(`listening on ${port}`));
"""

_GCC_APP = b"""\
#!/bin/sh
set -e
cat > /tmp/hello.c <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) { puts("hello from gcc"); return 0; }
EOF
gcc -O2 -o /tmp/hello /tmp/hello.c
/tmp/hello
echo ready
"""

# The cluster Debian's postinst created at install time is started as is; the socket goes
# to /tmp because nothing creates /run/postgresql in a container.
_POSTGRES_APP = b"""\
#!/bin/sh
set -e
bin=$(echo /usr/lib/postgresql/*/bin)
data=$(echo /var/lib/postgresql/*/main)
conf=$(echo /etc/postgresql/*/main/postgresql.conf)
exec runuser -u postgres -- "$bin/postgres" -D "$data" -c config_file="$conf" \\
  -c unix_socket_directories=/tmp -c listen_addresses=127.0.0.1 -c ssl=off 2>&1
"""

_MINBASE_APP = b"""\
#!/bin/sh
. /etc/os-release
echo "$PRETTY_NAME"
echo ready
"""

CATALOG: dict[str, BenchImage] = {
    image.name: image
    for image in (
        BenchImage(
            "python-scipy",
            "python3 with numpy, scipy and pandas; imports them and computes a mean",
            DebianImageSpec(
                packages=("python3", "python3-numpy", "python3-scipy", "python3-pandas"),
                app_files=(AppFile("app/main.py", _PYTHON_APP, 0o644),),
                cmd=("python3", "/app/main.py"),
                working_dir="/app",
            ),
            ready_pattern=r"^ready$",
        ),
        BenchImage(
            "python-fat-api",
            "a numpy HTTP service in a fat data-science image (scikit-learn, matplotlib,"
            " pandas, scipy installed); its start reads a small share of the image",
            DebianImageSpec(
                packages=(
                    "python3",
                    "python3-numpy",
                    "python3-scipy",
                    "python3-pandas",
                    "python3-sklearn",
                    "python3-matplotlib",
                ),
                app_files=(AppFile("app/api.py", _PYTHON_API_APP, 0o644),),
                cmd=("python3", "/app/api.py"),
                working_dir="/app",
            ),
            ready_pattern=r"^ready$",
            versions=_versions(
                AppFile("app/api.py", _PYTHON_API_APP, 0o644),
                (
                    b"weights = numpy.linspace(0.0, 1.0, 16)\n",
                    b'settings = json.load(open("/app/settings.json"))\n'
                    b'weights = numpy.linspace(0.0, 1.0, settings["weights"])\n',
                ),
                "app/settings.json",
                (b'{"weights": 32}\n', b'{"weights": 64}\n'),
            ),
        ),
        BenchImage(
            "python-torch",
            "the big image: python3 with PyTorch (Debian's libtorch, opencv, ffmpeg, BLAS);"
            " imports torch and multiplies a small tensor",
            DebianImageSpec(
                packages=("python3", "python3-torch"),
                app_files=(AppFile("app/main.py", _TORCH_APP, 0o644),),
                cmd=("python3", "/app/main.py"),
                working_dir="/app",
            ),
            ready_pattern=r"^ready$",
        ),
        BenchImage(
            "node-http",
            "Node.js HTTP server on port 8080",
            DebianImageSpec(
                packages=("nodejs",),
                app_files=(AppFile("app/server.js", _NODE_APP, 0o644),),
                cmd=("node", "/app/server.js"),
                working_dir="/app",
            ),
            ready_pattern=r"^listening on \d+$",
            ready_port=8080,
            versions=_versions(
                AppFile("app/server.js", _NODE_APP, 0o644),
                (
                    b'http\n  .createServer((req, res) => res.end("hello from node\\n"))',
                    b'const greeting = `${require("./greeting.json").text}\\n`;\n'
                    b"http\n  .createServer((req, res) => res.end(greeting))",
                ),
                "app/greeting.json",
                (b'{"text": "hello from node v2"}\n', b'{"text": "hello from node v3"}\n'),
            ),
        ),
        BenchImage(
            "gcc-hello",
            "gcc compiles and runs hello world",
            DebianImageSpec(
                packages=("gcc", "libc6-dev"),
                app_files=(AppFile("app/build.sh", _GCC_APP),),
                cmd=("/app/build.sh",),
            ),
            ready_pattern=r"^ready$",
        ),
        BenchImage(
            "postgres",
            "PostgreSQL server starting the cluster made at install time",
            DebianImageSpec(
                packages=("postgresql",),
                app_files=(AppFile("app/start.sh", _POSTGRES_APP),),
                cmd=("/app/start.sh",),
            ),
            ready_pattern=r"database system is ready to accept connections",
            ready_port=5432,
        ),
        BenchImage(
            "minbase",
            "Debian minbase alone (quick runs, smoke tests)",
            DebianImageSpec(
                packages=(),
                app_files=(AppFile("app/hello.sh", _MINBASE_APP),),
                cmd=("/app/hello.sh",),
            ),
            ready_pattern=r"^ready$",
            versions=_versions(
                AppFile("app/hello.sh", _MINBASE_APP),
                (b'echo "$PRETTY_NAME"\n', b'echo "$PRETTY_NAME, release $(cat /app/RELEASE)"\n'),
                "app/RELEASE",
                (b"2\n", b"3\n"),
            ),
        ),
    )
}


def build(name: str, cache_dir: Path = DEFAULT_CACHE) -> BuiltImage:
    """The OCI layout of catalog image ``name``, built into ``cache_dir`` on first use."""
    try:
        image = CATALOG[name]
    except KeyError:
        raise KeyError(f"no benchmark image {name!r}; known: {', '.join(CATALOG)}") from None
    return build_debian_image(name, image.spec, cache_dir)


def image_version(name: str, tag: str) -> ImageVersion | None:
    """Catalog image ``name``'s version ``tag`` (None for v1, which is the entry itself)."""
    if tag == FIRST_VERSION:
        return None
    for version in CATALOG[name].versions:
        if version.tag == tag:
            return version
    raise KeyError(f"{name} has no version {tag!r}")


def build_version(name: str, tag: str, cache_dir: Path = DEFAULT_CACHE) -> BuiltImage:
    """The OCI layout of version ``tag`` of catalog image ``name`` (v1: `build`).

    An app-only version is v1's image with a new top layer (lower layers by digest, as
    a cached `docker build` makes it); a version with a new base is built from scratch.
    """
    version = image_version(name, tag)
    if version is None:
        return build(name, cache_dir)
    spec = replace(CATALOG[name].spec, app_files=version.app_files)
    if version.base_packages:
        spec = replace(spec, base_packages=version.base_packages)
        return build_debian_image(f"{name}-{tag}", spec, cache_dir)
    return build_app_update(f"{name}-{tag}", build(name, cache_dir), spec, cache_dir)
