"""The demo graphs `make run` creates, so a fresh platform has something to run."""

from typing import Any

DEMO_GRAPHS: list[dict[str, Any]] = [
    {
        "slug": "fanout-summaries",
        "name": "Fan-out summaries",
        "description": "Splits a list of notes, summarises each with the (simulated) model, "
        "collects the summaries in order and stores one digest row.",
        "spec": {
            "nodes": [
                {
                    "id": "notes",
                    "type": "source.manual",
                    "config": {
                        "input_schema": {
                            "type": "object",
                            "required": ["topic", "notes"],
                            "properties": {
                                "topic": {"type": "string"},
                                "notes": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "example": {
                            "topic": "Release review",
                            "notes": [
                                "The importer now handles 20k PDFs per hour.",
                                "Two customers asked for Kafka sinks.",
                                "Cancel latency dropped below one decode step.",
                            ],
                        },
                    },
                },
                {
                    "id": "split",
                    "type": "fanout.split",
                    "config": {"field": "notes", "max_items": 200},
                },
                {
                    "id": "summarise",
                    "type": "llm.generate",
                    "config": {
                        "prompt": "Summarise in one line: {{ item }}",
                        "max_tokens": 40,
                        "output": "summary",
                    },
                },
                {"id": "gather", "type": "collect", "config": {"by": "split"}},
                {
                    "id": "digest",
                    "type": "transform.template",
                    "config": {
                        "template": (
                            "{% for s in items %}{{ loop.index }}. {{ s.summary }}\n{% endfor %}"
                        ),
                        "output": "digest",
                    },
                },
                {"id": "store", "type": "sink.table", "config": {"table": "digests"}},
            ],
            "edges": [
                ["notes", "split"],
                ["split", "summarise"],
                ["summarise", "gather"],
                ["gather", "digest"],
                ["digest", "store"],
            ],
            "policies": {"ttl_s": 900, "max_fanout": 200, "on_disconnect": "detach"},
        },
    },
    {
        "slug": "ticket-triage",
        "name": "Ticket triage",
        "description": "Routes a support ticket by priority: urgent ones get a drafted reply "
        "from the (simulated) model, the rest are filed with a template.",
        "spec": {
            "nodes": [
                {
                    "id": "ticket",
                    "type": "source.manual",
                    "config": {
                        "input_schema": {
                            "type": "object",
                            "required": ["title", "priority"],
                            "properties": {
                                "title": {"type": "string", "minLength": 1},
                                "body": {"type": "string"},
                                "priority": {"enum": ["high", "normal", "low"]},
                            },
                        },
                        "example": {
                            "title": "Export fails",
                            "body": "CSV export times out.",
                            "priority": "high",
                        },
                    },
                },
                {
                    "id": "route",
                    "type": "route.switch",
                    "config": {
                        "field": "priority",
                        "cases": {"high": "urgent"},
                        "default": "normal",
                    },
                },
                {
                    "id": "draft",
                    "type": "llm.generate",
                    "retry": {"max_attempts": 3, "backoff_s": 1},
                    "config": {
                        "prompt": "Draft a reply to: {{ title }}\n{{ body }}",
                        "max_tokens": 60,
                        "output": "reply",
                    },
                },
                {"id": "urgent_table", "type": "sink.table", "config": {"table": "urgent_replies"}},
                {
                    "id": "file",
                    "type": "transform.template",
                    "config": {
                        "template": "[{{ priority | upper }}] {{ title }}",
                        "output": "line",
                    },
                },
                {"id": "ticket_table", "type": "sink.table", "config": {"table": "tickets"}},
            ],
            "edges": [
                ["ticket", "route"],
                ["route", "draft", "urgent"],
                ["draft", "urgent_table"],
                ["route", "file", "normal"],
                ["file", "ticket_table"],
            ],
            "policies": {"ttl_s": 300, "on_disconnect": "detach"},
        },
    },
]
