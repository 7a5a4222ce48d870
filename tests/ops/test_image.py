"""The container image's build, run without Docker (none runs on these machines).

The Dockerfile's builder stage is replayed instruction by instruction: its build context
is the repository filtered through .dockerignore, each COPY copies from that context, and
each RUN runs with `sh -c` in the WORKDIR, with the build args set as Docker sets them.
So a file the build needs that .dockerignore leaves out, a manifest that names a target
whose file is not in the context, or a stub step that leaves the stub binary behind fails
here, not on a user's `just image` or in the release workflow.

The replay builds in target/image-build/ (kept between runs, so only the crate itself is
recompiled after the first one, which compiles every dependency in release: minutes).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

WORKDIR_ROOT = REPO / "target" / "image-build"
BUILD_ARGS = {"VERSION": "9.8.7-imagetest", "REVISION": "0123456789ab"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(dockerfile: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions after its FROM, by stage name (or index)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            current = m[1] if m else str(len(result))
            result[current] = [("FROM", rest)]
        elif current is not None:
            result[current].append((word, rest))
    return result


def context_files() -> list[str]:
    """The repository's files that .dockerignore lets into the build context.

    Only the forms this repository uses are understood (`*` and `!name` or `!name/`): any other
    pattern fails the test rather than being matched wrongly.
    """
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        assert "/" not in pattern and "**" not in pattern, (
            f".dockerignore pattern {line!r}: this replay only understands top-level names"
        )
        rules.append((negate, pattern))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    files = []
    for path in tracked.stdout.decode().split("\0"):
        if not path or not (REPO / path).exists():
            continue
        top = path.split("/", 1)[0]
        included = True
        for negate, pattern in rules:  # the last matching rule decides, as in Docker
            if fnmatch.fnmatchcase(top, pattern):
                included = negate
        if included:
            files.append(path)
    return files


def test_image_context_excludes_what_it_should():
    files = context_files()
    tops = {f.split("/", 1)[0] for f in files}
    assert {"Cargo.toml", "Cargo.lock", "src", "sql"} <= tops
    for excluded in ("kustomize", "tests", ".github", "scripts", "README.md"):
        assert excluded not in tops, f"{excluded} is in the image's build context"


def test_builder_toolchain_is_pinned_and_new_enough():
    """A pinned `rust:MAJOR.MINOR-bookworm` (bookworm: the runtime is distroless Debian 12, and a
    newer glibc in the builder would make a binary that does not start there), no older than
    the crate's rust-version."""
    builder = stages((REPO / "Dockerfile").read_text())["builder"][0][1]
    m = re.match(r"rust:(\d+)\.(\d+)(?:\.\d+)?-bookworm(?:@sha256:[0-9a-f]{64})?\s+AS\s+builder$", builder)
    assert m, f"FROM {builder}: expected rust:MAJOR.MINOR-bookworm AS builder"
    msrv = re.search(r'(?m)^rust-version = "(\d+)\.(\d+)', (REPO / "Cargo.toml").read_text())
    assert msrv, "Cargo.toml has no rust-version"
    assert (int(m[1]), int(m[2])) >= (int(msrv[1]), int(msrv[2])), (builder, msrv[0])


def test_dockerfile_builder_stage_builds_the_binary_from_its_context():
    dockerfile = (REPO / "Dockerfile").read_text()
    all_stages = stages(dockerfile)
    assert "builder" in all_stages, "the Dockerfile has no stage named builder"
    context = WORKDIR_ROOT / "context"
    shutil.rmtree(context, ignore_errors=True)
    for f in context_files():
        dest = context / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest)

    root = WORKDIR_ROOT / "root"  # the builder's filesystem: WORKDIR /build -> root/build
    workdir = None
    # Everything but the previous run's target/ goes, so the replay starts from the context.
    if root.exists():
        for build in root.iterdir():
            for entry in build.iterdir():
                if entry.name != "target":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGO_") or k == "CARGO_HOME"}
    env.pop("RUSTFLAGS", None)
    ran = 0
    for word, rest in all_stages["builder"]:
        if word == "WORKDIR":
            assert rest.startswith("/"), f"WORKDIR {rest}: expected an absolute path"
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "ARG":
            name = rest.split("=", 1)[0]
            env[name] = BUILD_ARGS.get(name, rest.split("=", 1)[1].strip('"') if "=" in rest else "")
        elif word == "ENV":
            pytest.fail(f"ENV in the builder stage is not replayed: {rest}")
        elif word == "COPY":
            assert not rest.startswith("--"), f"COPY flags are not replayed: {rest}"
            *sources, dest = rest.split()
            assert workdir is not None, "COPY before WORKDIR"
            target = workdir / dest
            if len(sources) > 1:
                assert dest.endswith("/"), f"COPY {rest}: several sources need a directory"
            for src in sources:
                origin = context / src
                assert origin.exists(), (
                    f"COPY {src}: not in the build context (.dockerignore leaves it out, or it "
                    "does not exist)"
                )
                # Docker copies a directory's contents, and a file into a `dir/` or onto a path.
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True)
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
        elif word == "RUN":
            assert workdir is not None, "RUN before WORKDIR"
            res = subprocess.run(["sh", "-c", rest], cwd=workdir, env=env, capture_output=True,
                                 text=True, timeout=1800)
            assert res.returncode == 0, (
                f"RUN {rest}\nfailed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
            )
            ran += 1
        elif word != "FROM":
            pytest.fail(f"{word} in the builder stage is not replayed")
    assert ran >= 2, "expected a dependency step and a build step"

    # The runtime stage copies the binary from the builder: it exists, it is the real service
    # (the stub of the dependency step prints nothing), and it carries the build args.
    runtime = all_stages[list(all_stages)[-1]]
    copies = [rest for word, rest in runtime if word == "COPY" and rest.startswith("--from=builder")]
    assert copies, "the runtime stage copies nothing from the builder"
    for rest in copies:
        src = rest.split()[1]
        binary = root / src.lstrip("/")
        assert binary.is_file(), f"COPY {rest}: the builder made no {src}"
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert BUILD_ARGS["VERSION"] in out.stdout, f"--version printed {out.stdout!r}"

