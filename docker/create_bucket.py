"""One-shot: wait for the S3 store, then create the artifact bucket if it does not exist."""

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError

bucket = os.environ["S3_BUCKET"]
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
for attempt in range(60):
    try:
        names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
        break
    except (BotoCoreError, ClientError) as exc:
        print(f"waiting for the S3 store ({attempt + 1}/60): {exc}", flush=True)
        time.sleep(2)
else:
    sys.exit("the S3 store never answered")
if bucket not in names:
    s3.create_bucket(Bucket=bucket)
print(f"bucket {bucket} ready")
