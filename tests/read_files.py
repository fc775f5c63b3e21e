"""Read every part file a files sink published, as a reader of the dataset would: the
files under the dataset's directory whose path has no part starting with `_` or `.`
(pyarrow's own rule) and that end in .parquet or .jsonl. Prints one JSON object:
the rows (each row's columns and its partition directories as `dir.<name>`), the files
read and their sizes, and the staged files left anywhere under the directory.

usage: read_files.py <dir or s3://bucket/prefix> [endpoint]
"""
import json
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def main():
    url = sys.argv[1]
    if url.startswith("s3://"):
        endpoint = sys.argv[2]
        scheme, host = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, access_key="sluice-test",
                               secret_key="sluice-test-secret", region="us-east-1")
        base = url[len("s3://"):].rstrip("/")
    else:
        fs = pafs.LocalFileSystem()
        base = url[len("file://"):] if url.startswith("file://") else url
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    rows, files, staged, sizes = [], [], [], {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        parts = rel.split("/")
        if rel.endswith(".inprogress"):
            staged.append(rel)
            continue
        if any(p.startswith(("_", ".")) for p in parts):
            continue
        dirs = {("dir." + p.split("=", 1)[0]): p.split("=", 1)[1] for p in parts[:-1] if "=" in p}
        if rel.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                table = pq.read_table(f)
            batch = table.to_pylist()
        elif rel.endswith(".jsonl"):
            with fs.open_input_stream(info.path) as f:
                batch = [json.loads(line) for line in f.read().decode().splitlines() if line]
        else:
            continue
        files.append(rel)
        sizes[rel] = info.size
        for r in batch:
            r.update(dirs)
            rows.append(r)
    json.dump({"rows": rows, "files": sorted(files), "staged": sorted(staged), "sizes": sizes}, sys.stdout)


main()
