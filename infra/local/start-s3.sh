#!/usr/bin/env bash
# A local S3 endpoint (moto's server, from the test extra) with a bucket holding the sample images.
#   bash infra/local/start-s3.sh            # http://127.0.0.1:9000, bucket "samples"
#   python -m jobs.generate --input s3://samples/images/ --output s3://samples/masks/ \
#       --s3-endpoint-url http://127.0.0.1:9000
set -euo pipefail
PORT="${PORT:-9000}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
moto_server -H 127.0.0.1 -p "$PORT" >/tmp/sam-datagen-s3-$PORT.log 2>&1 &
echo "$!" > /tmp/sam-datagen-s3-$PORT.pid
python - "$PORT" <<'PY'
import glob, os, socket, sys, time
import boto3
for _ in range(100):  # wait for the server to listen
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0:
            break
    time.sleep(0.1)
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
s3.create_bucket(Bucket="samples")
for path in glob.glob("pipeline/sample_images/*.[jp][pn]g"):
    s3.upload_file(path, "samples", f"images/{os.path.basename(path)}")
print(f"S3 at http://127.0.0.1:{sys.argv[1]}: bucket 'samples', images/ holds the sample images")
PY
echo "stop with: kill \$(cat /tmp/sam-datagen-s3-$PORT.pid)"
