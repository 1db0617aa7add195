"""registries.conf(5) v2 mirrors: parsing and matching, and pulls through the real crictl from real
loopback docker-registries serving as mirrors of registry.k8s.io and friends (no internet here)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pycrio.config import ConfigError, load_config
from pycrio.cri import api_pb2
from pycrio.images.registries_conf import PullSource, RegistriesConf, load_registries_conf
from tests.harness import PycrioDaemon, run_pycrio, tracing_args
from tests.otlp_receiver import STATUS_ERROR, OTLPReceiver
from tests.registry_fixture import AUTH_USER, BuiltImage, ImageBuilder, TestRegistry, free_port

PULL = "/runtime.v1.ImageService/PullImage"
K8S_BUSYBOX = "registry.k8s.io/e2e/busybox:1"

# /etc/containers/registries.conf as Debian 12's golang-github-containers-image ships it
# (comments only), and the head of containers-common's registries.conf.d/shortnames.conf.
DEBIAN_REGISTRIES_CONF = '''# For more information on this configuration file, see containers-registries.conf(5).
#
# NOTE: RISK OF USING UNQUALIFIED IMAGE NAMES
# We recommend always using fully qualified image names including the registry
# server (full dns name), namespace, image name, and tag
# (e.g., registry.redhat.io/ubi8/ubi:latest). Pulling by digest (i.e.,
# quay.io/repository/name@digest) further eliminates the ambiguity of tags.
# When using short names, there is always an inherent risk that the image being
# pulled could be spoofed. For example, a user wants to pull an image named
# `foobar` from a registry and expects it to come from myregistry.com. If
# myregistry.com is not first in the search list, an attacker could place a
# different `foobar` image at a registry earlier in the search list. The user
# would accidentally pull and run the attacker's image and code rather than the
# intended content. We recommend only adding registries which are completely
# trusted (i.e., registries which don't allow unknown or anonymous users to
# create accounts with arbitrary names). This will prevent an image from being
# spoofed, squatted or otherwise made insecure.  If it is necessary to use one
# of these registries, it should be added at the end of the list.
#
# # An array of host[:port] registries to try when pulling an unqualified image, in order.
# unqualified-search-registries = ["example.com"]
#
# [[registry]]
# # The "prefix" field is used to choose the relevant [[registry]] TOML table;
# # (only) the TOML table with the longest match for the input image name
# # (taking into account namespace/repo/tag/digest separators) is used.
# # 
# # The prefix can also be of the form: *.example.com for wildcard subdomain
# # matching.
# #
# # If the prefix field is missing, it defaults to be the same as the "location" field.
# prefix = "example.com/foo"
#
# # If true, unencrypted HTTP as well as TLS connections with untrusted
# # certificates are allowed.
# insecure = false
#
# # If true, pulling images with matching names is forbidden.
# blocked = false
#
# # The physical location of the "prefix"-rooted namespace.
# #
# # By default, this is equal to "prefix" (in which case "prefix" can be omitted
# # and the [[registry]] TOML table can only specify "location").
# #
# # Example: Given
# #   prefix = "example.com/foo"
# #   location = "internal-registry-for-example.net/bar"
# # requests for the image example.com/foo/myimage:latest will actually work with the
# # internal-registry-for-example.net/bar/myimage:latest image.
#
# # The location can be empty iff prefix is in a
# # wildcarded format: "*.example.com". In this case, the input reference will
# # be used as-is without any rewrite.
# location = internal-registry-for-example.com/bar"
#
# # (Possibly-partial) mirrors for the "prefix"-rooted namespace.
# #
# # The mirrors are attempted in the specified order; the first one that can be
# # contacted and contains the image will be used (and if none of the mirrors contains the image,
# # the primary location specified by the "registry.location" field, or using the unmodified
# # user-specified reference, is tried last).
# #
# # Each TOML table in the "mirror" array can contain the following fields, with the same semantics
# # as if specified in the [[registry]] TOML table directly:
# # - location
# # - insecure
# [[registry.mirror]]
# location = "example-mirror-0.local/mirror-for-foo"
# [[registry.mirror]]
# location = "example-mirror-1.local/mirrors/foo"
# insecure = true
# # Given the above, a pull of example.com/foo/image:latest will try:
# # 1. example-mirror-0.local/mirror-for-foo/image:latest
# # 2. example-mirror-1.local/mirrors/foo/image:latest
# # 3. internal-registry-for-example.net/bar/image:latest
# # in order, and use the first one that exists.
'''
DEBIAN_SHORTNAMES_CONF = '''[aliases]
  # almalinux
  "almalinux" = "docker.io/library/almalinux"
  "almalinux-minimal" = "docker.io/library/almalinux-minimal"
  # centos
  "centos" = "quay.io/centos/centos"
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def conf(tmp_path: Path, main: str | None = None, **dropins: str) -> RegistriesConf:
    """Load a main file (None: missing) and drop-ins from a temp dir."""
    main_path = tmp_path / "registries.conf"
    if main is not None:
        write(main_path, main)
    for name, text in dropins.items():
        write(tmp_path / "registries.conf.d" / name, text)
    return load_registries_conf(main_path, tmp_path / "registries.conf.d")


def refs(sources: list[PullSource]) -> list[tuple[str, bool, bool]]:
    return [(s.reference, s.mirror, s.insecure) for s in sources]


# -- parsing and matching ----------------------------------------------------------------------


def test_debian_default_files_parse_to_nothing(tmp_path: Path) -> None:
    parsed = conf(tmp_path, DEBIAN_REGISTRIES_CONF, **{"shortnames.conf": DEBIAN_SHORTNAMES_CONF})
    assert parsed.registries == ()
    assert parsed.search_registries is None  # the example list is commented out
    assert parsed.unknown == ()  # [aliases] is known: read, not used, no warning
    assert parsed.ignored == (f"{tmp_path}/registries.conf.d/shortnames.conf: aliases",)
    assert refs(parsed.pull_sources("docker.io/library/busybox", ":1", False)) == [
        ("docker.io/library/busybox:1", False, False)
    ]
    assert parsed.search_list(["docker.io"]) == ["docker.io"]


def test_the_host_files_parse_when_present() -> None:
    main = Path("/etc/containers/registries.conf")
    if not main.exists():
        pytest.skip("no /etc/containers/registries.conf on this host")
    parsed = load_registries_conf(main, Path("/etc/containers/registries.conf.d"))
    assert str(main) in parsed.files


def test_missing_files_are_fine(tmp_path: Path) -> None:
    parsed = conf(tmp_path)
    assert parsed == RegistriesConf()
    assert load_registries_conf(None, None) == RegistriesConf()


def test_mirrors_in_order_then_the_location_with_namespaces(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[[registry]]
prefix = "registry.k8s.io"
location = "registry.k8s.io"
[[registry.mirror]]
location = "127.0.0.1:5001/registry.k8s.io/"
insecure = true
[[registry.mirror]]
location = "mirror.example.net:5000/k8s"
''')
    assert refs(parsed.pull_sources("registry.k8s.io/e2e/busybox", ":1.29-2", False)) == [
        ("127.0.0.1:5001/registry.k8s.io/e2e/busybox:1.29-2", True, True),  # trailing / dropped
        ("mirror.example.net:5000/k8s/e2e/busybox:1.29-2", True, False),
        ("registry.k8s.io/e2e/busybox:1.29-2", False, False),
    ]
    digest = "@sha256:" + "a" * 64
    assert parsed.pull_sources("registry.k8s.io/pause", digest, True)[0].reference == (
        f"127.0.0.1:5001/registry.k8s.io/pause{digest}"
    )
    # pycrio's insecure_registries makes a host plain HTTP too
    assert [s.insecure for s in parsed.pull_sources("registry.k8s.io/pause", ":3", False, {"mirror.example.net:5000"})] == [
        True, True, False
    ]


def test_longest_prefix_wins_and_prefix_rewrites_to_location(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[[registry]]
location = "example.com"
insecure = true
[[registry]]
prefix = "example.com/foo"
location = "internal.example.net/bar"
[[registry]]
prefix = "example.com/foo/special"
location = "special.example.net"
blocked = true
''')
    assert parsed.find("example.com/foo/app").location == "internal.example.net/bar"
    assert refs(parsed.pull_sources("example.com/foo/app", ":1", False)) == [
        ("internal.example.net/bar/app:1", False, False)
    ]
    assert refs(parsed.pull_sources("example.com/other", ":1", False)) == [("example.com/other:1", False, True)]
    assert parsed.find("example.com/foo/special/x").blocked
    assert parsed.find("example.com/foo").prefix == "example.com/foo"  # the whole name matches
    # a prefix covers whole components and its own host only
    assert parsed.find("example.com/foobar/x").prefix == "example.com"
    assert parsed.find("example.com:5000/x") is None
    assert parsed.find("example.community/x") is None
    assert parsed.find("docker.io/library/busybox") is None


def test_wildcard_prefix(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[[registry]]
prefix = "*.example.com"
[[registry.mirror]]
location = "127.0.0.1:5001/wild"
[[registry]]
prefix = "*.corp.example.com"
location = "127.0.0.1:5002/corp"
insecure = true
''')
    assert refs(parsed.pull_sources("a.b.example.com/team/app", ":1", False)) == [
        ("127.0.0.1:5001/wild/team/app:1", True, False),
        ("a.b.example.com/team/app:1", False, False),  # no location: the name as it is
    ]
    assert parsed.find("x.corp.example.com:443/app").prefix == "*.corp.example.com"  # the longer wildcard
    assert refs(parsed.pull_sources("x.corp.example.com:443/app", ":1", False)) == [("127.0.0.1:5002/corp/app:1", False, True)]
    assert parsed.find("example.com/app") is None  # a subdomain is needed
    assert parsed.find("evil-example.com/app") is None
    assert parsed.find("registry.example.com.evil.net/app") is None


def test_pull_from_mirror_and_mirror_by_digest_only(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[[registry]]
location = "quay.io"
[[registry.mirror]]
location = "digests.local"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.local"
pull-from-mirror = "tag-only"
[[registry.mirror]]
location = "all.local"
[[registry]]
location = "gcr.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "gcr-mirror.local"
''')
    digest = "@sha256:" + "b" * 64
    assert [s.host for s in parsed.pull_sources("quay.io/a/b", ":1", False)] == ["tags.local", "all.local", "quay.io"]
    assert [s.host for s in parsed.pull_sources("quay.io/a/b", digest, True)] == ["digests.local", "all.local", "quay.io"]
    assert [s.host for s in parsed.pull_sources("gcr.io/a/b", ":1", False)] == ["gcr.io"]
    assert [s.host for s in parsed.pull_sources("gcr.io/a/b", digest, True)] == ["gcr-mirror.local", "gcr.io"]


def test_a_mirror_on_a_blocked_host_is_left_out_and_its_own_entry_can_make_it_insecure(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[[registry]]
location = "public.ecr.aws"
[[registry.mirror]]
location = "bad-mirror.local"
[[registry.mirror]]
location = "plain-mirror.local:5000"
[[registry]]
location = "bad-mirror.local"
blocked = true
[[registry]]
location = "plain-mirror.local:5000"
insecure = true
''')
    assert refs(parsed.pull_sources("public.ecr.aws/docker/library/busybox", ":1", False)) == [
        ("plain-mirror.local:5000/docker/library/busybox:1", True, True),
        ("public.ecr.aws/docker/library/busybox:1", False, False),
    ]


def test_dropins_replace_entries_of_the_same_prefix_add_others_and_replace_the_search_list(tmp_path: Path) -> None:
    main = '''
unqualified-search-registries = ["docker.io", "quay.io"]
[[registry]]
prefix = "registry.k8s.io"
location = "registry.k8s.io"
[[registry.mirror]]
location = "old-mirror.local/k8s"
[[registry]]
location = "gcr.io"
blocked = true
'''
    parsed = conf(
        tmp_path,
        main,
        **{
            "20-k8s.conf": '[[registry]]\nprefix = "registry.k8s.io"\nlocation = "registry.k8s.io"\n'
                           '[[registry.mirror]]\nlocation = "new-mirror.local/k8s"\n',
            "10-search.conf": 'unqualified-search-registries = ["mirror.local:5000"]\n',
            "30-ecr.conf": '[[registry]]\nlocation = "public.ecr.aws"\n[[registry.mirror]]\nlocation = "ecr-mirror.local"\n',
            "40-not-a-dropin.txt": "[[[ not toml",
        },
    )
    assert [s.host for s in parsed.pull_sources("registry.k8s.io/pause", ":3", False)] == ["new-mirror.local", "registry.k8s.io"]
    assert parsed.find("gcr.io/x").blocked  # untouched entries of the main file stay
    assert [s.host for s in parsed.pull_sources("public.ecr.aws/x", ":1", False)] == ["ecr-mirror.local", "public.ecr.aws"]
    assert parsed.search_registries == ("mirror.local:5000",)
    assert parsed.search_origin == str(tmp_path / "registries.conf.d" / "10-search.conf")
    assert [Path(f).name for f in parsed.files] == ["registries.conf", "10-search.conf", "20-k8s.conf", "30-ecr.conf"]
    # an empty list in a later drop-in clears it
    cleared = conf(tmp_path, main, **{"50-clear.conf": "unqualified-search-registries = []\n"})
    assert cleared.search_registries == ()


def test_version_1_format(tmp_path: Path) -> None:
    parsed = conf(tmp_path, '''
[registries.search]
registries = ["registry.local:5000", "docker.io"]
[registries.insecure]
registries = ["registry.local:5000"]
[registries.block]
registries = ["blocked.local"]
''')
    assert parsed.search_registries == ("registry.local:5000", "docker.io")
    assert parsed.find("registry.local:5000/x").insecure
    assert parsed.find("blocked.local/x").blocked


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[[registry]\n", None, "invalid TOML"),
        ('[[registry]]\nlocation = "https://mirror.local"\n', "registry[0].location", "must not have a URI scheme"),
        ('[[registry]]\nlocation = "a.io"\n[[registry]]\nlocation = "Bad_Host!"\n', "registry[1].location", "must be host[:port]"),
        ('[[registry]]\ninsecure = true\n', "registry[0].location", "must be set"),
        ('[[registry]]\nprefix = "example.com/foo"\n', "registry[0].location", "must be set for prefix"),
        ('[[registry]]\nprefix = "*.example.com:5000"\n', "registry[0].prefix", "a wildcard prefix must be"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"\n', "registry[0].insecure", "must be a boolean"),
        ('[[registry]]\nlocation = "a.io"\nblocked = 1\n', "registry[0].blocked", "must be a boolean"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n', "registry[0].mirror[0].location", "must be set"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "never"\n',
         "registry[0].mirror[0].pull-from-mirror", "must be one of all, digest-only, tag-only"),
        ('[[registry]]\nlocation = "a.io"\npull-from-mirror = "all"\n', "registry[0].pull-from-mirror", "only a [[registry.mirror]]"),
        ('[[registry]]\nlocation = "a.io"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m.io"\n'
         'pull-from-mirror = "all"\n', "registry[0].mirror[0].pull-from-mirror", "mirror-by-digest-only"),
        ('[[registry]]\nprefix = "a.io/x"\nlocation = "a.io"\n[[registry]]\nprefix = "a.io/y"\nlocation = "a.io"\ninsecure = true\n',
         "registry[1].insecure", "conflicting 'insecure'"),
        ('unqualified-search-registries = "docker.io"\n', "unqualified-search-registries", "must be an array of strings"),
        ('unqualified-search-registries = ["docker.io/library"]\n', "unqualified-search-registries", "must list registry hosts"),
        ('short-name-mode = "sometimes"\n', "short-name-mode", "must be one of disabled, enforcing, permissive"),
        ('registry = "a.io"\n', "registry", "must be an array of tables"),
        ('[registries.search]\nregistries = ["a.io"]\n[[registry]]\nlocation = "b.io"\n', "registries", "mixing version 1"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    path = write(tmp_path / "registries.conf", text)
    with pytest.raises(ConfigError) as err:
        load_registries_conf(path, None)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: " if key else f"{path}: ")
    assert problem in message and "\n" not in message


def test_a_bad_dropin_is_named_and_version_1_is_refused_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registries.conf.d/10-v1.conf: registries: version 1 format"):
        conf(tmp_path, "", **{"10-v1.conf": '[registries.search]\nregistries = ["a.io"]\n'})


def test_unknown_keys_are_warnings_of_the_pycrio_load(tmp_path: Path) -> None:
    registries = write(tmp_path / "registries.conf", '''
short-name-mode = "enforcing"
credential-helpers = ["containers-auth.json"]
colour = "blue"
[[registry]]
location = "a.io"
mirrors = []
''')
    pycrio_conf = write(tmp_path / "pycrio.conf", f'[pycrio.image]\nregistries_conf = "{registries}"\nregistries_conf_dir = ""\n')
    loaded = load_config(pycrio_conf, tmp_path / "none")
    assert f"{registries}: unknown key 'colour' ignored" in loaded.warnings
    assert f"{registries}: unknown key 'registry[0].mirrors' ignored" in loaded.warnings
    assert loaded.registries is not None and loaded.registries.find("a.io/x") is not None
    assert any("short-name-mode" in i for i in loaded.registries.ignored)


def test_search_list_precedence(tmp_path: Path) -> None:
    registries = write(tmp_path / "registries.conf", 'unqualified-search-registries = ["mirror.local:5000", "quay.io"]\n')
    keys = f'registries_conf = "{registries}"\nregistries_conf_dir = ""\n'

    def search(pycrio_text: str) -> list[str]:
        loaded = load_config(write(tmp_path / "pycrio.conf", pycrio_text), tmp_path / "none")
        assert loaded.registries is not None
        return loaded.registries.search_list(loaded.config.image.unqualified_search_registries)

    # pycrio's key not set in a pycrio file: registries.conf's list
    assert search(f"[pycrio.image]\n{keys}") == ["mirror.local:5000", "quay.io"]
    # set, even to the default: pycrio's
    assert search(f'[pycrio.image]\n{keys}unqualified_search_registries = ["docker.io"]\n') == ["docker.io"]
    # registries.conf sets an empty list: pycrio's default
    write(registries, "unqualified-search-registries = []\n")
    assert search(f"[pycrio.image]\n{keys}") == ["docker.io"]


def test_config_command_shows_the_keys_and_refuses_a_bad_file(tmp_path: Path) -> None:
    out = run_pycrio("config", "--default").stdout
    assert '# registries_conf = "/etc/containers/registries.conf"' in out
    assert '# registries_conf_dir = "/etc/containers/registries.conf.d"' in out
    registries = write(tmp_path / "registries.conf", '[[registry]]\nlocation = "http://a.io"\n')
    pycrio_conf = write(tmp_path / "pycrio.conf", f'[pycrio.image]\nregistries_conf = "{registries}"\n')
    result = run_pycrio("--config", str(pycrio_conf), "--config-dir", str(tmp_path / "none"), "config")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"pycrio: {registries}: registry[0].location: must not have a URI scheme (write host[:port][/path]), "
        "got 'http://a.io'"
    )
    shown = run_pycrio("--config", str(write(pycrio_conf, f'[pycrio.image]\nregistries_conf_dir = "{tmp_path}/d"\n')),
                       "--config-dir", str(tmp_path / "none"), "config").stdout
    assert f'\nregistries_conf_dir = "{tmp_path}/d"\n' in shown


# -- pulls through mirrors: real daemon, real crictl, real docker-registries -------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """The loopback mirror: it holds images under their source registry's name."""
    with TestRegistry(tmp_path_factory.mktemp("mirror")) as reg:
        yield reg


@pytest.fixture(scope="module")
def empty_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A mirror that answers but has nothing."""
    with TestRegistry(tmp_path_factory.mktemp("empty-mirror")) as reg:
        yield reg


@pytest.fixture(scope="module")
def k8s_busybox(image_builder: ImageBuilder, mirror: TestRegistry) -> BuiltImage:
    """registry.k8s.io/e2e/busybox:1, pushed to the mirror as 127.0.0.1:PORT/registry.k8s.io/e2e/busybox:1."""
    return image_builder.busybox("registry.k8s.io/e2e/busybox", "1", registry=mirror)


def mirrored(source: str, *mirrors: str, location: str | None = None, insecure: bool = False) -> str:
    """One [[registry]] block for `source` with loopback (plain HTTP) mirrors."""
    text = f'[[registry]]\nprefix = "{source}"\nlocation = "{location or source}"\ninsecure = {str(insecure).lower()}\n'
    for m in mirrors:
        text += f'[[registry.mirror]]\nlocation = "{m}"\ninsecure = true\n'
    return text


def start(make_daemon, registries: str, receiver: OTLPReceiver | None = None, **dropins: str) -> PycrioDaemon:
    daemon = make_daemon(start=False, args=tracing_args(receiver.endpoint) if receiver else [])
    write(daemon.registries_conf, registries)
    for name, text in dropins.items():
        write(daemon.registries_conf_dir / name, text)
    return daemon.start()


def pull(daemon: PycrioDaemon, image: str, auth: api_pb2.AuthConfig | None = None) -> api_pb2.PullImageResponse:
    with daemon.channel() as ch:
        return daemon.images(ch).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image), auth=auth), timeout=60)


def pull_error(daemon: PycrioDaemon, image: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, image)
    return err.value


def source_spans(receiver: OTLPReceiver) -> list:
    """The pull_source spans of the last pull, in the order they ran (then forgotten)."""
    [root] = receiver.wait_for(lambda s: s.name == PULL)
    spans = [s for s in receiver.settle(quiet=0.5) if s.trace_id == root.trace_id and s.name == "pull_source"]
    receiver.clear()
    return sorted(spans, key=lambda s: s.start_ns)


def outcomes(spans: list) -> list[tuple[str, bool, str]]:
    return [(s.attributes["registry.host"], s.attributes["mirror"], s.attributes["outcome"]) for s in spans]


def listed(daemon: PycrioDaemon) -> list[dict]:
    return json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]


def test_pull_through_a_mirror_keeps_the_asked_name(make_daemon, receiver, mirror, k8s_busybox) -> None:
    daemon = start(make_daemon, mirrored("registry.k8s.io", f"{mirror.address}/registry.k8s.io"), receiver)
    assert f"registries configuration from {daemon.registries_conf}: registry.k8s.io mirrors {mirror.address}" in daemon.logs()
    receiver.clear()
    out = daemon.crictl("pull", K8S_BUSYBOX, tracing_endpoint=receiver.endpoint).stdout
    assert f"Image is up to date for {k8s_busybox.config_digest}" in out
    [entry] = listed(daemon)
    assert entry["repoTags"] == [K8S_BUSYBOX]
    assert entry["repoDigests"] == [f"registry.k8s.io/e2e/busybox@{k8s_busybox.digest}"]
    assert "registry.k8s.io/e2e/busybox" in daemon.crictl("images").stdout
    assert json.loads(daemon.crictl("inspecti", K8S_BUSYBOX).stdout)["status"]["id"] == k8s_busybox.config_digest
    # one attempt: the mirror had it, registry.k8s.io itself was never asked
    [source] = source_spans(receiver)
    assert outcomes([source]) == [(mirror.address, True, "found")]
    assert source.attributes["image.reference"] == f"{mirror.address}/registry.k8s.io/e2e/busybox:1"
    assert source.attributes["insecure"] is True


def test_mirrors_down_or_without_the_image_fall_through_to_the_next(make_daemon, receiver, mirror, empty_mirror, k8s_busybox) -> None:
    down = f"127.0.0.1:{free_port()}"
    daemon = start(
        make_daemon,
        mirrored("registry.k8s.io", f"{down}/registry.k8s.io", f"{empty_mirror.address}/registry.k8s.io",
                 f"{mirror.address}/registry.k8s.io"),
        receiver,
    )
    receiver.clear()
    assert pull(daemon, K8S_BUSYBOX).image_ref == k8s_busybox.config_digest
    spans = source_spans(receiver)
    assert outcomes(spans) == [
        (down, True, "unavailable"),
        (empty_mirror.address, True, "not_found"),
        (mirror.address, True, "found"),
    ]
    assert [s.status_code == STATUS_ERROR for s in spans] == [True, True, False]
    logs = daemon.logs()
    assert f"mirror {down}/registry.k8s.io/e2e/busybox:1 failed, trying the next source" in logs
    assert f"mirror {empty_mirror.address}/registry.k8s.io/e2e/busybox:1 failed, trying the next source" in logs
    assert [e["repoTags"] for e in listed(daemon)] == [[K8S_BUSYBOX]]


def test_when_every_source_fails_the_error_is_the_registry_s_and_names_the_mirrors(make_daemon, empty_mirror) -> None:
    down = f"127.0.0.1:{free_port()}"
    daemon = start(
        make_daemon,
        mirrored("gcr.io", f"{down}/gcr.io", location=f"{empty_mirror.address}/gcr.io", insecure=True),
    )
    err = pull_error(daemon, "gcr.io/authenticated-image-pulling/alpine:3.7")
    assert err.code() == grpc.StatusCode.NOT_FOUND  # the location's answer
    assert f"not found on registry {empty_mirror.address}" in err.details()
    assert f"mirrors also failed: {down}/gcr.io/authenticated-image-pulling/alpine:3.7: " in err.details()


def test_a_blocked_registry_is_permission_denied(make_daemon, mirror, k8s_busybox) -> None:
    daemon = start(
        make_daemon,
        '[[registry]]\nlocation = "k8s.gcr.io"\nblocked = true\n'
        # mirrors do not unblock it
        + mirrored("registry.k8s.io", f"{mirror.address}/registry.k8s.io").replace(
            "insecure = false\n", "insecure = false\nblocked = true\n"),
    )
    err = pull_error(daemon, "k8s.gcr.io/pause:3.1")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == (
        f"image k8s.gcr.io/pause:3.1: pulling from registry k8s.gcr.io is blocked by {daemon.registries_conf}"
    )
    result = daemon.crictl("pull", K8S_BUSYBOX, check=False)
    assert result.returncode != 0 and "PermissionDenied" in result.stderr and "registry.k8s.io is blocked" in result.stderr
    assert listed(daemon) == []


def test_wildcard_prefix_rewrites_every_subdomain(make_daemon, image_builder, mirror) -> None:
    image = image_builder.busybox("wild/team/busybox", "1", registry=mirror)
    daemon = start(make_daemon, f'[[registry]]\nprefix = "*.example.com"\nlocation = "{mirror.address}/wild"\ninsecure = true\n')
    daemon.crictl("pull", "img.example.com/team/busybox:1")
    daemon.crictl("pull", "eu.img.example.com/team/busybox:1")
    [entry] = listed(daemon)
    assert entry["id"] == image.config_digest
    assert sorted(entry["repoTags"]) == ["eu.img.example.com/team/busybox:1", "img.example.com/team/busybox:1"]


def test_dropin_dir_overrides_the_main_file(make_daemon, receiver, mirror, k8s_busybox) -> None:
    down = f"127.0.0.1:{free_port()}"
    daemon = start(
        make_daemon,
        mirrored("registry.k8s.io", f"{down}/registry.k8s.io") + '[[registry]]\nlocation = "gcr.io"\nblocked = true\n',
        receiver,
        **{
            "50-mirror.conf": mirrored("registry.k8s.io", f"{mirror.address}/registry.k8s.io"),
            "60-later.conf": 'unqualified-search-registries = ["registry.k8s.io"]\n',
        },
    )
    receiver.clear()
    daemon.crictl("pull", K8S_BUSYBOX)
    assert outcomes(source_spans(receiver)) == [(mirror.address, True, "found")]  # the main file's mirror is gone
    assert pull_error(daemon, "gcr.io/x/y:1").code() == grpc.StatusCode.PERMISSION_DENIED  # the rest of it stays
    # the drop-in's search list serves short names (no pycrio file sets unqualified_search_registries)
    daemon.crictl("rmi", K8S_BUSYBOX)
    daemon.crictl("pull", "e2e/busybox:1")
    assert [e["repoTags"] for e in listed(daemon)] == [[K8S_BUSYBOX]]


def test_sighup_adds_a_mirror_and_a_bad_file_keeps_the_old_one(make_daemon, mirror, empty_mirror, k8s_busybox) -> None:
    without = mirrored("registry.k8s.io", location=f"{empty_mirror.address}/registry.k8s.io", insecure=True)
    daemon = start(make_daemon, without)
    assert pull_error(daemon, K8S_BUSYBOX).code() == grpc.StatusCode.NOT_FOUND

    write(daemon.registries_conf, mirrored(
        "registry.k8s.io", f"{mirror.address}/registry.k8s.io",
        location=f"{empty_mirror.address}/registry.k8s.io", insecure=True,
    ))
    hup(daemon, "registries.conf applied")
    assert pull(daemon, K8S_BUSYBOX).image_ref == k8s_busybox.config_digest

    daemon.crictl("rmi", K8S_BUSYBOX)
    write(daemon.registries_conf_dir / "10-bad.conf", '[[registry]]\nlocation = "registry.k8s.io"\n[[registry.mirror]]\n')
    logs = hup(daemon, "configuration reload rejected")
    assert (
        "configuration reload rejected, the running configuration stays in force: "
        f"{daemon.registries_conf_dir}/10-bad.conf: registry[0].mirror[0].location: must be set"
    ) in logs
    assert pull(daemon, K8S_BUSYBOX).image_ref == k8s_busybox.config_digest  # the mirror stays


def hup(daemon: PycrioDaemon, text: str) -> str:
    """SIGHUP the daemon and wait for `text` in the log lines it writes afterwards."""
    offset = len(daemon.logs())
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log(text)
    deadline_logs = daemon.logs()
    assert text in deadline_logs[offset:], deadline_logs[offset:]
    return deadline_logs[offset:]


def test_a_bad_file_stops_start_up_with_one_line(make_daemon) -> None:
    daemon = make_daemon(start=False)
    write(daemon.registries_conf, '[[registry]]\nlocation = "registry.k8s.io"\n[[registry.mirror]]\nlocation = "https://m.local"\n')
    result = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"pycrio: {daemon.registries_conf}: registry[0].mirror[0].location: must not have a URI scheme "
        "(write host[:port][/path]), got 'https://m.local'"
    ]
    assert not daemon.socket.exists()


def test_cri_credentials_go_to_a_mirror_only_when_server_address_names_it(
    make_daemon, receiver, mirror, auth_registry, image_builder, k8s_busybox
) -> None:
    image_builder.busybox("registry.k8s.io/e2e/busybox", "1", registry=auth_registry)
    daemon = start(
        make_daemon,
        mirrored("registry.k8s.io", f"{auth_registry.address}/registry.k8s.io",
                 location=f"{mirror.address}/registry.k8s.io", insecure=True),
        receiver,
    )
    receiver.clear()
    # crictl --creds sends no server_address: the mirror is asked anonymously and refuses
    daemon.crictl("pull", "--creds", ":".join(AUTH_USER), K8S_BUSYBOX)
    assert outcomes(source_spans(receiver)) == [
        (auth_registry.address, True, "unauthenticated"),
        (mirror.address, False, "found"),
    ]
    daemon.crictl("rmi", K8S_BUSYBOX)
    auth = api_pb2.AuthConfig(username=AUTH_USER[0], password=AUTH_USER[1], server_address=f"http://{auth_registry.address}")
    assert pull(daemon, K8S_BUSYBOX, auth).image_ref == k8s_busybox.config_digest
    assert outcomes(source_spans(receiver)) == [(auth_registry.address, True, "found")]
