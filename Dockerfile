FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterhouse ./meterhouse
RUN pip install --no-cache-dir .
EXPOSE 4317 4318 9464
ENTRYPOINT ["meterhouse"]
CMD ["up", "--host", "0.0.0.0", "--data-dir", "/var/lib/meterhouse"]
