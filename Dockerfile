# llm-ha in a container: the `llm-ha` command as a non-root user; mount the profile read-only.
#
#   docker build -t llm-ha:0.2.0 .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:9091:9091 -v "$PWD/profiles:/profiles:ro" \
#       llm-ha:0.2.0 run /profiles/mine.yaml --listen-host 0.0.0.0 --status 0.0.0.0:9091
#
# Inside the container both servers listen on every interface so that the published ports reach them;
# publish them on the host's loopback (127.0.0.1:...) as above: the status server has no authentication.
# deploy/compose.yaml runs it with the simulators, Prometheus and Grafana.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY addons ./addons
COPY sim ./sim
COPY bench ./bench
# The wheels of llm-ha and of every dependency, so that the final image installs without a compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 llmha
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels llm-ha && rm -rf /wheels
USER llmha
WORKDIR /home/llmha
EXPOSE 8080 9091
ENTRYPOINT ["llm-ha"]
CMD ["run", "/profiles/profile.yaml", "--listen-host", "0.0.0.0", "--status", "0.0.0.0:9091"]
