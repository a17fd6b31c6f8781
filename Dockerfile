# The router: embedded Redis by default (set AUXOT_REDIS_URL for a real one and several routers).
#   docker build -t auxot-router .
#   docker run --rm auxot-router setup          # keys, printed once, and their hashes
#   docker run -p 8080:8080 -e AUXOT_API_KEY_HASH=... -e AUXOT_ADMIN_KEY_HASH=... auxot-router
# tests/test_deploy.py performs the build stage's steps into an empty directory and starts the
# result, so keep RUN lines to paths relative to WORKDIR and to variables set with ENV.

FROM python:3.12-slim AS build
ENV VIRTUAL_ENV=/opt/auxot PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt ./
RUN python -m venv "$VIRTUAL_ENV" && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md registry.json auxot_router.py auxot_worker.py ./
COPY auxot_common/ auxot_common/
RUN "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --no-deps . && "$VIRTUAL_ENV/bin/auxot-router" version \
    && "$VIRTUAL_ENV/bin/python" -m pip uninstall --yes --quiet pip

FROM python:3.12-slim
ENV VIRTUAL_ENV=/opt/auxot PATH=/opt/auxot/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 AUXOT_PORT=8080
COPY --from=build /opt/auxot /opt/auxot
WORKDIR /tmp
USER 65532:65532
EXPOSE 8080
# Liveness only (GET /ping on AUXOT_PORT): a Redis outage must not get the container restarted.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["auxot-router", "ping"]
ENTRYPOINT ["auxot-router"]
