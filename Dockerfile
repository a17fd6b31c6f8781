# The router: embedded Redis by default (set AUXOT_REDIS_URL for a real one and several routers).
#   docker build -t auxot-router .
#   docker run -p 8080:8080 -e AUXOT_API_KEY_HASH=... -e AUXOT_ADMIN_KEY_HASH=... auxot-router
# Generate the keys and hashes with: docker run --rm auxot-router setup
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY auxot_common/ auxot_common/
COPY auxot_router.py auxot_worker.py registry.json ./

RUN useradd --system --uid 65532 --home-dir /app auxot
USER auxot
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health').status != 200)"
ENTRYPOINT ["python", "auxot_router.py"]
