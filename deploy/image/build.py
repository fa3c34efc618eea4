"""Build a hero-rewards image: `make image` (python3 deploy/image/build.py --help).

It builds a Dockerfile target with docker when a Docker daemon answers, else with buildah
(chroot isolation, no daemon), and finds what the build needs:

- the base (PYTHON_IMAGE): the Dockerfile's official Python image when a registry gives it, else
  a local one: Debian bookworm from the Debian mirror apt uses here (debootstrap, minbase) plus
  python3 and venv, imported as localhost/hero-rewards-python:bookworm-<recipe>. It is built
  once and reused while the recipe below is unchanged;
- torch: the Dockerfile's PyTorch index when it answers, else the torch wheels in pip's
  find-links directories, served to the build from 127.0.0.1 for its duration;
- the CA bundle pip is configured with here (PIP_CERT, pip's `cert`), passed as the build secret
  `ca-bundle`, so that pip in the build trusts a TLS-intercepting proxy; never in the image.

Each is a choice you can make instead (flags, or the environment variables in brackets, which
`make image VAR=...` sets). Missing tools (buildah, podman, debootstrap) are installed with
apt-get when run as root on a machine that has it. Standard library only."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CA_SECRET_ID = "ca-bundle"
# The build argument that names each target's torch index.
TORCH_INDEX_ARG = {"cpu": "TORCH_INDEX_URL", "cuda": "TORCH_CUDA_INDEX_URL"}

# The local base: what debootstrap installs and what is done after it. Its hash is in the image
# tag, so changing the recipe builds a new base instead of reusing a stale one.
LOCAL_BASE_SUITE = "bookworm"
LOCAL_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
LOCAL_BASE_RECIPE = {
    "suite": LOCAL_BASE_SUITE, "variant": "minbase", "include": LOCAL_BASE_PACKAGES,
    # the official image has `python`; Debian has python3 only
    "python_link": "/usr/local/bin/python -> /usr/bin/python3",
    "trimmed": ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc/*",
                "usr/share/man/*", "usr/share/info/*"),
}
FALLBACK_MIRROR = "http://deb.debian.org/debian"
# The loopback wheel server's port, when free: its URL is a build argument of the torch step,
# so the same URL each time lets that step come from the layer cache.
WHEEL_SERVER_PORT = 47861


def log(message: str) -> None:
    print(f"image: {message}", flush=True)


class ImageError(SystemExit):
    """A reason the build cannot go on, printed as one line with exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def run(cmd: Sequence[str], *, timeout: float | None = None, check: bool = True,
        capture: bool = False, env: dict[str, str] | None = None,
        stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(list(cmd), text=True, timeout=timeout, env=env, stdin=stdin,
                             stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.PIPE if capture else None)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{cmd[0]} did not finish within {timeout:.0f} s: {' '.join(cmd)}") \
            from None
    if check and out.returncode != 0:
        detail = (out.stderr or "").strip().splitlines()[-3:] if capture else []
        raise ImageError(f"{' '.join(cmd[:3])} ... failed with status {out.returncode}"
                         + (": " + " | ".join(detail) if detail else ""))
    return out


def can_install_packages() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


@functools.cache
def apt_updated() -> None:
    run(["apt-get", "update", "-qq"], timeout=600)


def ensure_tool(binary: str, package: str, purpose: str) -> str:
    """The path of `binary`, installing Debian's `package` first when it is missing."""
    found = shutil.which(binary)
    if found:
        return found
    if not can_install_packages():
        who = "not root" if os.geteuid() != 0 else "no apt-get here"
        raise ImageError(f"{binary} is missing ({purpose}) and cannot be installed ({who}): "
                         f"install the {package} package")
    log(f"installing {package} ({purpose})")
    apt_updated()
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], timeout=900,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which(binary)
    if not found:
        raise ImageError(f"installed {package} but {binary} is still not on PATH")
    return found


def dockerfile_default(name: str) -> str:
    """The default of a global `ARG name=value` in the Dockerfile: one source for both."""
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    if match is None:
        raise ImageError(f"Dockerfile: no default for ARG {name}")
    return match.group(1)


# --- builders --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Builder:
    name: str  # "docker" or "buildah"

    def image_exists(self, ref: str) -> bool:
        cmd = (["docker", "image", "inspect", ref] if self.name == "docker"
               else ["buildah", "inspect", "--type", "image", ref])
        return run(cmd, check=False, capture=True, timeout=60).returncode == 0

    def pull(self, ref: str) -> bool:
        out = run([self.name, "pull", ref], check=False, capture=True, timeout=900)
        if out.returncode != 0:
            last = (out.stderr or out.stdout).strip().splitlines()[-1:]
            log(f"cannot pull {ref}: {last[0] if last else 'no reason given'}")
        return out.returncode == 0

    def import_rootfs(self, rootfs: Path, ref: str) -> None:
        importer = "docker" if self.name == "docker" else ensure_tool(
            "podman", "podman", "podman import turns a root filesystem into an image")
        with subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                              stdout=subprocess.PIPE) as tar:
            run([importer, "import", "-", ref], stdin=tar.stdout.fileno() if tar.stdout else None,
                capture=True, timeout=900)
        if tar.returncode != 0:
            raise ImageError(f"tar of {rootfs} failed with status {tar.returncode}")

    def size_bytes(self, ref: str) -> int:
        if self.name == "docker":
            out = run(["docker", "image", "inspect", "-f", "{{.Size}}", ref], capture=True)
        else:
            out = run(["podman", "image", "inspect", "--format", "{{.Size}}", ref], capture=True)
        return int(out.stdout.strip())

    def build_command(self, *, target: str, tag: str, build_args: dict[str, str],
                      ca_bundle: Path | None, host_network: bool) -> list[str]:
        if self.name == "docker":
            cmd = ["docker", "build", "--target", target, "-t", tag]
            if host_network:  # the loopback wheel server must be reachable from RUN steps
                cmd += ["--network", "host"]
        else:
            # chroot isolation: no daemon and RUN steps on the host network; docker format
            # keeps the HEALTHCHECK; --layers caches every step for the next build.
            cmd = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers",
                   "--force-rm",  # a failed build leaves no working container behind
                   "--target", target, "-t", tag]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        if ca_bundle is not None:
            cmd += ["--secret", f"id={CA_SECRET_ID},src={ca_bundle}"]
        return [*cmd, "-f", str(DOCKERFILE), str(REPO)]


def docker_daemon_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return run(["docker", "info"], check=False, capture=True, timeout=30).returncode == 0


def choose_builder(choice: str) -> Builder:
    if choice == "docker" or (choice == "auto" and docker_daemon_answers()):
        if choice == "docker" and not docker_daemon_answers():
            raise ImageError("IMAGE_BUILDER=docker, but no Docker daemon answers `docker info`")
        return Builder("docker")
    ensure_tool("buildah", "buildah", "buildah builds the image without a daemon")
    ensure_tool("podman", "podman", "podman reports image sizes and imports base images")
    if os.geteuid() != 0:
        raise ImageError("buildah with chroot isolation runs as root here (a rootless buildah "
                         "needs subordinate uids): run as root, or with a Docker daemon")
    return Builder("buildah")


# --- the base image --------------------------------------------------------------------------
def local_base_ref() -> str:
    digest = hashlib.sha256(json.dumps(LOCAL_BASE_RECIPE, sort_keys=True).encode()).hexdigest()
    return f"localhost/hero-rewards-python:{LOCAL_BASE_SUITE}-{digest[:10]}"


def apt_sources() -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every enabled Debian source apt has here, one-line and deb822 forms."""
    root = Path("/etc/apt")
    one_line = [root / "sources.list", *sorted((root / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((root / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() \
                    and fields.get("Enabled", "yes").lower() != "no":
                for uri in fields.get("URIs", "").split():
                    yield uri, fields.get("Suites", "").split()


def debian_mirror() -> str:
    """The Debian archive apt uses here (a mirror or proxy may be all that is reachable)."""
    for uri, suites in apt_sources():
        main_suites = [s for s in suites if not s.endswith(("-security", "-updates"))]
        if main_suites and "security" not in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def build_local_base(builder: Builder, ref: str) -> None:
    debootstrap = ensure_tool("debootstrap", "debootstrap", "it builds the local base image")
    mirror = debian_mirror()
    started = time.monotonic()
    log(f"building the local base {ref}: debootstrap {LOCAL_BASE_SUITE} from {mirror}")
    # /var/tmp: debootstrap needs a file system without nodev/noexec, which /tmp may have.
    with tempfile.TemporaryDirectory(prefix="hero-rewards-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run([debootstrap, "--variant=minbase", "--include=" + ",".join(LOCAL_BASE_PACKAGES),
             LOCAL_BASE_SUITE, str(rootfs), mirror], capture=True, timeout=1800)
        for pattern in LOCAL_BASE_RECIPE["trimmed"]:
            for path in rootfs.glob(str(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        builder.import_rootfs(rootfs, ref)
    log(f"local base built in {time.monotonic() - started:.0f} s")


def resolve_base(builder: Builder, choice: str) -> str:
    """The PYTHON_IMAGE to build on: official, local, or auto (official if it can be had)."""
    official = dockerfile_default("PYTHON_IMAGE")
    if choice in ("official", "auto"):
        if builder.image_exists(official) or builder.pull(official):
            return official
        if choice == "official":
            raise ImageError(f"IMAGE_BASE=official, but {official} cannot be pulled")
        log("no registry gives the official base: using a local one (IMAGE_BASE=local)")
    elif choice != "local":
        return choice  # an image reference of the caller's
    ref = local_base_ref()
    if builder.image_exists(ref):
        log(f"reusing the local base {ref}")
    else:
        build_local_base(builder, ref)
    return ref


# --- torch -----------------------------------------------------------------------------------
def index_answers(url: str, ca_bundle: Path | None) -> bool:
    import ssl

    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=20,
                                    context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError) as error:
        log(f"torch index {url} does not answer: {error}")
        return False


def pip_config_values(key: str) -> list[str]:
    """Values of `key` (e.g. find-links, cert) in pip's environment and configuration here."""
    values = os.environ.get(f"PIP_{key.upper().replace('-', '_')}", "").split()
    pip = [sys.executable, "-m", "pip", "config", "list"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(pip, capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            name, _, value = line.partition("=")
            if name.rsplit(".", 1)[-1] == key:
                values += value.strip().strip("'\"").split()
    return values


def local_torch_wheels() -> list[Path]:
    """torch wheels in pip's local find-links directories (one per file name: the environment
    and pip's configuration often name the same directory)."""
    wheels: dict[str, Path] = {}
    for place in pip_config_values("find-links"):
        directory = Path(place.removeprefix("file://"))
        if "://" not in place.removeprefix("file://") and directory.is_dir():
            for wheel in sorted(directory.glob("torch-*.whl")):
                wheels.setdefault(wheel.name, wheel)
    return list(wheels.values())


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # requests are not news
        pass


@contextlib.contextmanager
def serve_wheels(wheels: Sequence[Path]) -> Iterator[str]:
    """A pip index on 127.0.0.1 holding only these torch wheels, for the build's duration."""
    with tempfile.TemporaryDirectory(prefix="hero-rewards-wheels-") as tmp:
        project = Path(tmp) / "torch"
        project.mkdir()
        for wheel in wheels:
            (project / wheel.name).symlink_to(wheel.resolve())
        handler = functools.partial(QuietHandler, directory=tmp)
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_SERVER_PORT), handler)
        except OSError:  # taken: any free port (the torch step then misses the layer cache)
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)


@contextlib.contextmanager
def torch_index(target: str, index_url: str, wheels_dir: str,
                ca_bundle: Path | None) -> Iterator[tuple[str, bool]]:
    """(the index URL for the build, whether it is a loopback server)."""
    if wheels_dir:
        wheels = sorted(Path(wheels_dir).glob("torch-*.whl"))
        if not wheels:
            raise ImageError(f"TORCH_WHEELS={wheels_dir}: no torch-*.whl there")
    elif index_url:
        yield index_url, False
        return
    else:
        default = dockerfile_default(TORCH_INDEX_ARG[target])
        if index_answers(default, ca_bundle):
            yield default, False
            return
        wheels = local_torch_wheels()
        if not wheels:
            raise ImageError(f"the torch index {default} does not answer and pip's find-links "
                             "hold no torch wheel: set TORCH_INDEX_URL (a mirror) or "
                             "TORCH_WHEELS (a directory of torch wheels)")
    log("torch from local wheels: " + ", ".join(w.name for w in wheels))
    with serve_wheels(wheels) as url:
        yield url, True


def resolve_ca_bundle(choice: str) -> Path | None:
    if choice == "none":
        return None
    candidates = [choice] if choice else pip_config_values("cert")
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    if choice:
        raise ImageError(f"CA_BUNDLE={choice}: no such file")
    return None


# --- the build -------------------------------------------------------------------------------
STAGE_LABEL = "io.hero-rewards.stage"  # on every image the Dockerfile's steps make
STEP_IMAGE = re.compile(r"^--> (?:Using cache )?([0-9a-f]{11,64})\s*$")


def run_build(cmd: Sequence[str], env: dict[str, str]) -> set[str] | None:
    """Runs the build, echoing its output; the ids of the step images it made or reused (buildah
    prints them), or None if it failed."""
    used: set[str] = set()
    with subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            match = STEP_IMAGE.match(line)
            if match:
                used.add(match.group(1))
    sys.stdout.flush()
    return used if process.returncode == 0 else None


def prune_stale_cache(used: set[str]) -> None:
    """Removes this Dockerfile's untagged step images that the build just made did not use:
    each changed source would otherwise leave ~2 GB of cache behind (a new torch layer and
    venv copy). Images with children refuse removal, so the chains in use stay."""
    removed = 0
    while True:  # leaves first: a removed leaf may leave its parent untagged and childless
        listing = run(["podman", "images", "--all", "--no-trunc", "--filter", "dangling=true",
                       "--filter", f"label={STAGE_LABEL}", "--format", "{{.ID}}"],
                      capture=True, check=False)
        stale = [i.removeprefix("sha256:") for i in listing.stdout.split()]
        stale = [i for i in stale if not any(i.startswith(u) for u in used)]
        gone = sum(run(["podman", "rmi", i], capture=True, check=False).returncode == 0
                   for i in stale)
        removed += gone
        if not gone:
            break
    if removed:
        log(f"removed {removed} stale cached step images of earlier builds")


@dataclass(frozen=True)
class Built:
    builder: Builder
    tag: str
    base: str
    seconds: float
    size_bytes: int


def build_image(args: argparse.Namespace) -> Built:
    builder = choose_builder(args.builder)
    ca_bundle = resolve_ca_bundle(args.ca_bundle)
    started = time.monotonic()
    base = resolve_base(builder, args.base)
    with torch_index(args.target, args.torch_index_url, args.torch_wheels, ca_bundle) \
            as (index, loopback):
        build_args = {"PYTHON_IMAGE": base, TORCH_INDEX_ARG[args.target]: index}
        cmd = builder.build_command(target=args.target, tag=args.tag, build_args=build_args,
                                    ca_bundle=ca_bundle, host_network=loopback)
        log(f"building target {args.target} as {args.tag} with {builder.name} on {base}"
            + (f", CA bundle {ca_bundle} as the build secret {CA_SECRET_ID}" if ca_bundle
               else ""))
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        used = run_build(cmd, env)
        if used is None:
            raise ImageError(f"the {builder.name} build of target {args.target} failed "
                             "(its output is above)")
    if builder.name == "buildah":
        prune_stale_cache(used)
    built = Built(builder, args.tag, base, time.monotonic() - started,
                  builder.size_bytes(args.tag))
    log(f"built {built.tag} in {built.seconds:.0f} s; size {built.size_bytes / 1e9:.2f} GB "
        f"({built.size_bytes} bytes)")
    return built


def add_build_options(parser: argparse.ArgumentParser, *, builders: Sequence[str]) -> None:
    env = os.environ.get
    parser.add_argument("--target", default="cpu", choices=sorted(TORCH_INDEX_ARG),
                        help="Dockerfile target (default: cpu)")
    parser.add_argument("--tag", default="", help="image name (default: "
                        "localhost/hero-rewards:TARGET) [IMAGE_TAG]")
    parser.add_argument("--builder", default=env("IMAGE_BUILDER", "auto"),
                        choices=builders, help="[IMAGE_BUILDER]")
    parser.add_argument("--base", default=env("IMAGE_BASE", "auto"),
                        help="official, local, auto or an image reference [IMAGE_BASE]")
    parser.add_argument("--torch-index-url", default=env("TORCH_INDEX_URL", ""),
                        help="pip index for torch (default: the Dockerfile's, if it answers) "
                        "[TORCH_INDEX_URL]")
    parser.add_argument("--torch-wheels", default=env("TORCH_WHEELS", ""),
                        help="a directory of torch wheels to build with [TORCH_WHEELS]")
    parser.add_argument("--ca-bundle", default=env("CA_BUNDLE", ""),
                        help="CA bundle for pip in the build, or none (default: pip's cert "
                        "setting here, if any) [CA_BUNDLE]")


def parse_build_args(parser: argparse.ArgumentParser,
                     argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.tag = args.tag or os.environ.get("IMAGE_TAG") or f"localhost/hero-rewards:{args.target}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_build_options(parser, builders=("auto", "docker", "buildah"))
    try:
        build_image(parse_build_args(parser, argv))
    except ImageError as error:
        print(f"image: error: {error.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
