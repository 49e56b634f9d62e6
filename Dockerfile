# CPU image serving one trained model with `imgclf serve` (REST API, web page, OpenAPI docs).
#
#   docker build -t imgclf .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/flowers:/model:ro" imgclf
#   docker run --rm -p 8000:8000 -v "$PWD/runs/flowers:/model:ro" -v imgclf-cache:/cache -e IMGCLF_API_KEY="$KEY" imgclf
#
# Arguments after the image name are appended to `imgclf serve /model --host 0.0.0.0 --port 8000`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMGCLF_CACHE=/cache

# CPU-only PyTorch: the default PyPI wheels carry CUDA libraries (gigabytes) that a CPU server never uses.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && useradd --create-home --uid 1000 imgclf \
    && mkdir -p /cache \
    && chown imgclf /cache

USER imgclf
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["imgclf", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
