"""Push notifications select tagged image pushes, never our own output."""

import pytest

from converter.push_events import ServerConfig, ServerConfigError, images_to_convert
from fetcher import mediatypes as mt

D = "sha256:" + "c" * 64


def _event(tag, media_type=mt.OCI_MANIFEST, action="push", repository="apps/web"):
    return {
        "action": action,
        "target": {
            "mediaType": media_type,
            "digest": D,
            "repository": repository,
            "url": f"http://127.0.0.1:5000/v2/{repository}/manifests/{D}",
            **({"tag": tag} if tag else {}),
        },
    }


def test_only_tagged_image_pushes_are_taken():
    envelope = {
        "events": [
            _event("v1"),
            _event("v1_accelerated"),
            _event("sha256-" + "c" * 64),
            _event(None),
            _event("v2", media_type="application/octet-stream"),
            _event("v3", action="pull"),
            _event("v4", media_type=mt.DOCKER_MANIFEST_LIST),
        ]
    }
    found = images_to_convert(envelope, None)
    assert [(p.registry, p.repository, p.tag) for p in found] == [
        ("127.0.0.1:5000", "apps/web", "v1"),
        ("127.0.0.1:5000", "apps/web", "v4"),
    ]
    assert images_to_convert(envelope, "reg:1")[0].registry == "reg:1"


def test_malformed_envelope():
    with pytest.raises(ValueError):
        images_to_convert({"nope": 1}, None)


def test_rules_first_match_wins(tmp_path):
    plist = tmp_path / "p.txt"
    plist.write_text("/app/\n")
    config = ServerConfig.from_dict(
        {
            "listen": "127.0.0.1:9000",
            "repositories": [
                {"match": "apps/*", "mode": "full", "prefetch_list": str(plist)},
                {"match": "*", "mode": "index"},
            ],
        }
    )
    assert config.listen_port == 9000
    rule = config.rule_for("apps/web")
    assert rule is not None and rule.mode == "full" and rule.prefetch.as_paths() == ["/app/"]
    other = config.rule_for("lib/x")
    assert other is not None and other.mode == "index"
    assert ServerConfig.from_dict({}).rule_for("x") is None


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"repositories": [{"mode": "full"}]},
        {"repositories": [{"match": "*", "mode": "turbo"}]},
        {"listen": "nohost"},
    ],
)
def test_bad_config(doc):
    with pytest.raises(ServerConfigError):
        ServerConfig.from_dict(doc)
