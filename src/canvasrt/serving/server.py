"""`canvasrt serve`: starts a tritonserver on a model repository, bound to 127.0.0.1, and stops it cleanly.

Two environments meet here. The server: a `tritonserver` binary with its libraries and Python backend, found in the
nvidia-pytriton wheel (or on PATH). The models' Python: Triton's Python stub embeds the system's libpython in an
isolated interpreter, which sees the packages of `python_env` through CANVASRT_PYTHONPATH (the repository's
model.py adds it). That environment must hold canvasrt, numpy and onnxruntime, and its numpy must be older than 2:
the stub of Triton 2.51 was built against numpy 1, and under numpy 2 it returns tensors of the wrong size.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..core.errors import CanvasrtError
from ..core.output import remove_stale_staging, staging_prefix
from .guard import HttpGuard

SCRATCH = "canvasrt-serve"  # the scratch directories' name in the temporary directory, tagged with host and pid


@dataclass(frozen=True)
class Installation:
    binary: Path
    backends: Path  # the --backend-directory holding python/
    libraries: Path | None  # the wheel's bundled shared libraries
    stubs: Path | None  # python_backend_stubs/<X.Y>/triton_python_backend_stub, one per Python version


@dataclass(frozen=True)
class PythonEnv:
    site_packages: Path
    version: str  # "3.11"


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on at the moment, for servers in tests and benchmarks."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def python_env(path: str | Path | None) -> PythonEnv:
    """A virtual environment (or a site-packages directory) for the Python-backend models; None: this one."""
    if path is None:
        import sysconfig

        return PythonEnv(Path(sysconfig.get_paths()["purelib"]), f"{sys.version_info[0]}.{sys.version_info[1]}")
    path = Path(path).resolve()
    if (path / "pyvenv.cfg").is_file():
        sites = sorted(path.glob("lib/python3.*/site-packages"))
        if sites:
            return PythonEnv(sites[0], sites[0].parent.name.removeprefix("python"))
    elif path.is_dir():
        return PythonEnv(path, f"{sys.version_info[0]}.{sys.version_info[1]}")
    raise CanvasrtError(f"--python-env {path} is neither a virtual environment nor a site-packages directory")


def check_python_env(env: PythonEnv) -> None:
    """The Python-backend models import canvasrt, numpy < 2 and onnxruntime from `env`; say what is missing."""
    found = {}
    for dist in env.site_packages.glob("*.dist-info"):
        name, _, version = dist.name.removesuffix(".dist-info").partition("-")
        found[name.lower().replace("_", "-")] = version
    missing = [p for p in ("canvasrt", "numpy", "onnxruntime") if p not in found]
    fix = (
        "make one with the server's Python: `python3.11 -m venv .venv-triton && .venv-triton/bin/pip install "
        "'numpy<2' onnxruntime tokenizers && .venv-triton/bin/pip install --no-deps -e .` (scripts/setup.sh does)"
    )
    if missing:
        raise CanvasrtError(f"the models' Python environment {env.site_packages} lacks {', '.join(missing)}; {fix}")
    if int(found["numpy"].split(".")[0]) >= 2:
        raise CanvasrtError(
            f"the models' Python environment has numpy {found['numpy']}, but Triton's Python backend "
            f"needs numpy<2; {fix}"
        )


def find_installation(env: PythonEnv) -> Installation:
    """tritonserver from the nvidia-pytriton wheel in `env` or in this Python, else from PATH."""
    import importlib.util

    roots = [env.site_packages / "pytriton"]
    spec = importlib.util.find_spec("pytriton")
    if spec and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        binary = root / "tritonserver" / "bin" / "tritonserver"
        if binary.is_file():
            libraries = root.parent / "nvidia_pytriton.libs"
            return Installation(
                binary,
                root / "tritonserver" / "backends",
                libraries if libraries.is_dir() else None,
                root / "tritonserver" / "python_backend_stubs",
            )
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), Path("/opt/tritonserver/backends"), None, None)
    raise CanvasrtError("no tritonserver found: install nvidia-pytriton (it bundles one) or put tritonserver on PATH")


def backend_directory(installation: Installation, env: PythonEnv, scratch: Path) -> Path:
    """A backend directory whose Python backend has the stub for the models' Python version next to it.

    The wheel ships one stub per Python version beside the backend instead of in it; linking the backend into a
    scratch directory leaves the installed wheel untouched."""
    if installation.stubs is None:
        return installation.backends
    stub = installation.stubs / env.version / "triton_python_backend_stub"
    if not stub.is_file():
        raise CanvasrtError(
            f"this tritonserver has no Python-backend stub for Python {env.version}; use a Python "
            f"environment of one of {', '.join(sorted(p.name for p in installation.stubs.iterdir()))}"
        )
    python = scratch / "backends" / "python"
    python.mkdir(parents=True)
    for item in (installation.backends / "python").iterdir():
        (python / item.name).symlink_to(item)
    (python / stub.name).symlink_to(stub)
    return python.parent


def check_port_options(ports: dict[str, int]) -> None:
    """Ports as tritonserver needs them: each its own, within 1-65535. Port 0 would let the server pick one that
    nobody is told of, and the readiness probe would wait for its timeout on a port nothing listens on."""
    for option, port in ports.items():
        if not 1 <= port <= 65535:
            raise CanvasrtError(f"{option} must be between 1 and 65535, got {port}")
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise CanvasrtError(f"{seen[port]} and {option} are both {port}; give each endpoint its own port")
        seen[port] = option


def check_port_free(option: str, port: int, host: str = "127.0.0.1") -> None:
    """Refuses a port something already listens on, naming the option that chose it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = (
                "is in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            )
            raise CanvasrtError(f"port {port} on {host} {reason}; choose another with {option}") from None


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the child SIGTERM when this process dies, however it dies: a SIGKILL of
    `canvasrt serve` (or of a test) must not leave tritonserver holding the ports. The signal follows the thread
    that started the child, so start servers from a thread that outlives them (the main thread does). Triton drains
    and unloads on SIGTERM, so its Python stubs and shared memory go too. None where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: after fork the child should only make the call
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class TritonServer:
    """A tritonserver process on a model repository; a context manager that waits for readiness and stops it."""

    def __init__(
        self,
        repository: str | Path,
        python_env_path: str | Path | None = None,
        http_port: int = 8000,
        grpc_port: int = 8001,
        log: Path | None = None,
        startup_timeout: float = 120.0,
        metrics_port: int | None = None,
        extra_sites: tuple[Path, ...] = (),
    ):
        """metrics_port: Triton's Prometheus endpoint (None: any free port; `metrics_url` says which). extra_sites:
        site-packages the models see after their environment's (PyTorch for the torch executor, say)."""
        self.repository = Path(repository).resolve()
        if not any(self.repository.glob("*/config.pbtxt")):
            raise CanvasrtError(f"{repository} holds no model (no */config.pbtxt); write one with `canvasrt triton`")
        self.http_port, self.grpc_port = http_port, grpc_port
        # Triton's own HTTP server listens on a port of its own behind the guard (see guard.py) on http_port
        self.guard: HttpGuard | None = None
        self.metrics_port = free_ports(1)[0] if metrics_port is None else metrics_port
        check_port_options(self.ports())
        self.env = python_env(python_env_path)
        check_python_env(self.env)
        self.extra_sites = tuple(Path(p) for p in extra_sites)
        self.installation = find_installation(self.env)
        self.check_ports()
        self.log = log
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.scratch: Path | None = None
        self._log_file: BinaryIO | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.installation.binary),
            "--model-repository",
            str(self.served_repository),
            "--backend-directory",
            str(backends),
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(self.guard.upstream if self.guard else self.http_port),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            # CPU metrics and the models' own (batch occupancy); a CPU-only server has no GPU metrics to collect
            "--allow-metrics",
            "true",
            "--allow-gpu-metrics",
            "false",
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--log-verbose",
            "0",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub's interpreter looks for `python3` on PATH to find its prefix: a virtual environment's bin/ there
        # (an activated .venv, say) would hand it that environment's site-packages, numpy 2 included.
        env["PATH"] = os.pathsep.join(
            entry
            for entry in env.get("PATH", "").split(os.pathsep)
            if entry and not (Path(entry).parent / "pyvenv.cfg").is_file()
        )
        if self.installation.libraries:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [str(self.installation.libraries), env.get("LD_LIBRARY_PATH")])
            )
        env["CANVASRT_PYTHONPATH"] = os.pathsep.join(map(str, (self.env.site_packages, *self.extra_sites)))
        return env

    def ports(self) -> dict[str, int]:
        return {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}

    def check_ports(self) -> None:
        """A port already served would answer the readiness probe for another server; refuse it up front."""
        for option, port in self.ports().items():
            check_port_free(option, port)

    def start(self) -> None:
        # Named after this process, so that a run after a SIGKILLed one (which cannot clean up) removes its leftovers.
        temporary = Path(tempfile.gettempdir())
        remove_stale_staging(temporary, SCRATCH)
        self.scratch = Path(tempfile.mkdtemp(prefix=staging_prefix(SCRATCH), suffix=".partial", dir=temporary))
        # Triton's Python stub parses its command line, the model's path included, at spaces: it sees the repository
        # through a link whose path has none (the scratch directory's, under a temporary directory without spaces).
        self.served_repository = self.repository
        if " " in str(self.repository):
            if " " in str(self.scratch):
                self._release()
                raise CanvasrtError(
                    f"the repository path {self.repository} and the temporary directory {temporary} both contain "
                    "spaces, which Triton's Python backend cannot take; set TMPDIR to a directory without spaces"
                )
            self.served_repository = self.scratch / "repository"
            self.served_repository.symlink_to(self.repository, target_is_directory=True)
        self.log_path = self.log or self.scratch / "tritonserver.log"
        try:
            self._log_file = open(self.log_path, "wb")
        except OSError as exc:
            self._release()
            raise CanvasrtError(
                f"cannot write the server log {self.log_path} ({exc.strerror}); give --log a file in "
                "a writable directory"
            ) from None
        self.guard = HttpGuard(self.http_port, free_ports(1)[0])
        try:
            self.guard.start()
        except OSError as exc:
            self.guard = None
            self._release()
            raise CanvasrtError(
                f"cannot serve HTTP on port {self.http_port} ({exc.strerror}); pick another --http-port"
            ) from None
        self.process = subprocess.Popen(
            self.command(backend_directory(self.installation, self.env, self.scratch)),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
            preexec_fn=stop_with_parent(),
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                self.keep_log()
                message = f"tritonserver exited with code {self.process.returncode}: {self.failure()}"
                self.stop()
                raise CanvasrtError(message)
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.keep_log()
        message = f"tritonserver was not ready after {self.startup_timeout:.0f}s: {self.failure()}"
        self.stop()
        raise CanvasrtError(message)

    def keep_log(self) -> None:
        """Moves a server log kept in the scratch directory (no --log) out of it, beside it in the temporary
        directory, so that the error naming it names a file that still exists after the scratch is removed."""
        if self.scratch is not None and Path(self.log_path).parent == self.scratch:
            kept = Path(tempfile.mkstemp(prefix="canvasrt-tritonserver-", suffix=".log")[1])
            shutil.copyfile(self.log_path, kept)
            self.log_path = kept

    def failure(self) -> str:
        """The most telling line of the server log (a model's load error, else the last error line) and where the
        log is."""
        return f"{self._telling_line()} (server log: {self.log_path})"

    def _telling_line(self) -> str:
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        for marker in ("failed to load", "error:", "Error"):
            hits = [line for line in lines if marker in line and "CudaDriverHelper" not in line and "NVML" not in line]
            if hits:
                hint = (
                    (
                        "; this server lacks that backend: write the repository with `canvasrt triton --step-backend "
                        "in-process` (or python)"
                    )
                    if "unable to find backend library" in hits[0]
                    else ""
                )
                return hits[0].strip()[:400] + hint
        return "no error line in the server log"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Triton drains in-flight requests and unloads models), then SIGKILL after `timeout`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release()
        return self.process.returncode if self.process is not None else None

    def kill(self) -> None:
        """SIGKILL to the server and its Python stubs (one process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._release()

    def _release(self) -> None:
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        if self._log_file is not None:
            self._log_file.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
