# covidct: one image for the listener, the workers and the web dashboard.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY covidct ./covidct
COPY ingest ./ingest
COPY worker ./worker
COPY classifier ./classifier
COPY web ./web
COPY models ./models
# dicom3tools: dciodvfy checks every object the worker sends (COVIDCT_DCIODVFY)
RUN apt-get update && apt-get install -y --no-install-recommends dicom3tools \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --upgrade pip && pip install . \
    && useradd --system --uid 10001 --home-dir /data covidct \
    && mkdir -p /data && chown covidct /data

USER covidct
ENV COVIDCT_DATA_DIR=/data COVIDCT_MODEL_PATH=/app/models/covidct.keras
VOLUME ["/data"]
EXPOSE 11112 8000
ENTRYPOINT ["covidct"]
CMD ["--help"]
