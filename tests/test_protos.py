"""The committed generated code is exactly what grpc_tools makes from cluster.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT

GENERATED = ("cluster_pb2.py", "cluster_pb2_grpc.py", "cluster_pb2.pyi")


def test_generated_code_is_up_to_date(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "cluster.proto", tmp_path / "protos" / "cluster.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", "--pyi_out=.", "protos/cluster.proto"],
                   cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos`"


def test_generated_modules_import_as_a_package():
    from protos import cluster_pb2, cluster_pb2_grpc

    assert "Forward" in cluster_pb2.DESCRIPTOR.services_by_name["NodeService"].methods_by_name
    assert hasattr(cluster_pb2_grpc, "NodeServiceStub")
