"""Where Ray Tune keeps a search's experiment state and trial checkpoints (docs/guides/cluster.md).

The search's own ``ray/`` folder by default; on a cluster, ``--storage`` or ``$COMOD_STORAGE``: a folder every
node mounts, or a URI pyarrow reads (``s3://bucket/prefix``; S3-compatible servers through ``AWS_ENDPOINT_URL``
or ``?endpoint_override=HOST:PORT&scheme=http``). :func:`check_shared` checks that every node reads what the
driver writes there; ``python -m comod_platform.storage check STORAGE`` runs it from a Ray job."""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from contextlib import suppress

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS", "COMOD_DOWNLOAD")
"""Driver settings that trials on a remote cluster need too (storage credentials, offline mode)."""


class StorageError(RuntimeError):
    """The storage cannot hold the search; the message says why and what to do."""


def is_uri(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def resolve(storage: str | None, default: str) -> str:
    """``storage`` if given, else ``$COMOD_STORAGE``, else the embedded ``default`` folder."""
    chosen = (storage or os.environ.get("COMOD_STORAGE") or default).removeprefix("file://")
    return chosen if is_uri(chosen) else os.path.abspath(os.path.expanduser(chosen))


def join(storage: str, *parts: str) -> str:
    if is_uri(storage):
        base, sep, query = storage.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query
    return os.path.join(storage, *parts)


def filesystem(storage: str):
    """(pyarrow filesystem, path inside it) of a storage folder or URI."""
    import pyarrow.fs

    if not is_uri(storage):
        return pyarrow.fs.LocalFileSystem(), storage
    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise StorageError(f"storage {storage}: {err}; give a folder on a shared mount or a URI such as "
                           f"s3://BUCKET/PREFIX (S3-compatible servers: set AWS_ENDPOINT_URL)") from None


def _reads_marker(storage: str, path: str, token: str) -> str | None:
    """None if the marker reads back here, else what went wrong."""
    try:
        fs, _ = filesystem(storage)
        with fs.open_input_stream(path) as stream:
            found = stream.read().decode()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None if found == token else "another file is at the probe's path"


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared(storage: str) -> int:
    """Check that each node of the Ray cluster (``ray.init`` first) reads a file this process writes to
    ``storage`` (one node: that it can be written); returns the number of nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    fs, root = filesystem(storage)
    token = uuid.uuid4().hex
    path = f"{root.rstrip('/')}/.comod-probe-{token}"
    try:
        fs.create_dir(root.rstrip("/") or "/", recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(token.encode())
    except Exception as err:  # noqa: BLE001
        raise StorageError(f"cannot write to storage {storage}: {err}; check that it exists and that this "
                           f"machine may write there (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           f"endpoint: AWS_ENDPOINT_URL)") from None
    try:
        if len(nodes) <= 1:
            return len(nodes)
        probe = ray.remote(num_cpus=0, max_retries=0)(_reads_marker)
        pending = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(storage, path, token)
            for n in nodes}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=120)
        problems = {}
        for node, ref in pending.items():
            try:
                result = ray.get(ref) if ref in ready else "the probe did not run within 120 s"
            except Exception as err:  # noqa: BLE001 - a node that cannot run the probe cannot use the storage
                result = f"the probe did not run: {type(err).__name__}"
            if result is not None:
                problems[node] = result
        if problems:
            where = "; ".join(f"{node}: {why}" for node, why in problems.items())
            raise StorageError(
                f"storage {storage} is not shared by the cluster's {len(nodes)} nodes: {len(problems)} cannot "
                f"read what this node writes there ({where}). Trial checkpoints would stay on node-local disks "
                f"and be lost when a trial moves; give --storage (or COMOD_STORAGE) a folder on a mount every "
                f"node shares, or s3://BUCKET/PREFIX")
        return len(nodes)
    finally:
        with suppress(Exception):  # a probe file left behind is harmless
            fs.delete_file(path)


def worker_env() -> dict[str, str]:
    """The forwarded settings this driver has, for a remote cluster's workers, secrets left out (Ray's
    dashboard shows a runtime environment: the nodes need their own keys or a mounted credentials file)."""
    from comod_platform.credentials import is_secret

    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and not is_secret(k, os.environ[k])}


def main(argv: list[str] | None = None) -> int:
    """``python -m comod_platform.storage check STORAGE [--address ADDR]``: run the shared-storage check."""
    p = argparse.ArgumentParser(prog="python -m comod_platform.storage")
    p.add_argument("command", choices=["check"])
    p.add_argument("storage")
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, or the job's cluster)")
    args = p.parse_args(argv)
    import ray

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        nodes = check_shared(resolve(args.storage, args.storage))
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"storage {args.storage}: shared by all {nodes} node(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
