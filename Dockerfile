FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterhouse ./meterhouse
COPY collector ./collector
COPY exporter ./exporter
COPY dashboards ./dashboards
COPY alerts ./alerts
RUN pip install --no-cache-dir .
EXPOSE 4317 4318 9464
ENTRYPOINT ["meterhouse"]
# Inside a container the API listens on all interfaces: mount a config with auth.tokens, or keep
# --allow-unauthenticated only on a private network.
CMD ["up", "--host", "0.0.0.0", "--allow-unauthenticated", "--data-dir", "/var/lib/meterhouse"]
