FROM python:3.11.9-slim-bookworm
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY meterhouse ./meterhouse
COPY collector ./collector
COPY exporter ./exporter
COPY dashboards ./dashboards
COPY alerts ./alerts
# gcc builds the native encoders and the decoder's fast path (setup.py) and is removed again in the
# same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && (cd / && python -c 'import meterhouse.collector._otlpfast') \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/meterhouse --shell /usr/sbin/nologin meterhouse \
    && mkdir -p /var/lib/meterhouse && chown meterhouse:meterhouse /var/lib/meterhouse
USER 10001:10001
EXPOSE 4317 4318 9464
ENTRYPOINT ["meterhouse"]
# On all interfaces the API refuses to start without tokens: mount a config file with auth.tokens
# (docker-compose.yml passes one as a secret with --config).
CMD ["up", "--host", "0.0.0.0", "--data-dir", "/var/lib/meterhouse"]
