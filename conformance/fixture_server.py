#!/usr/bin/env python3
"""
The MCP server that the conformance suite (C{@modelcontextprotocol/conformance})
tests: every tool, resource and prompt its server scenarios call, written with
the mcp 1.x SDK (C{FastMCP}).

    python conformance/fixture_server.py stdio
    python conformance/fixture_server.py http --port 8931 [--host 127.0.0.1]

Over HTTP it serves Streamable HTTP at C{http://HOST:PORT/mcp}, with sessions
(C{Mcp-Session-Id}, C{DELETE} ends one) and answers streamed as server-sent
events. Requests whose C{Host} or C{Origin} is not the loopback name they were
sent to are refused (421 and 403): a local server must defend itself against
DNS rebinding.

What the suite checks, and what this server does for it:

- tools: C{test_simple_text}, C{test_image_content}, C{test_audio_content},
  C{test_embedded_resource}, C{test_multiple_content_types},
  C{test_tool_with_logging} (three C{notifications/message} at level info,
  50 ms apart), C{test_tool_with_progress} (progress 0, 50, 100 of 100 when
  the call carries a progress token), C{test_sampling} {prompt}
  (C{sampling/createMessage}), C{test_elicitation} {message},
  C{test_elicitation_sep1034_defaults} and C{test_elicitation_sep1330_enums}
  (C{elicitation/create} with the schemas of SEP-1034 and SEP-1330), and
  C{test_error_handling} (a result with C{isError: true});
- resources: C{test://static-text}, C{test://static-binary}, the template
  C{test://template/{id}/data} and C{test://watched-resource}, with
  C{resources/subscribe} and C{resources/unsubscribe};
- prompts: C{test_simple_prompt}, C{test_prompt_with_arguments} {arg1, arg2},
  C{test_prompt_with_embedded_resource} {resourceUri} and
  C{test_prompt_with_image};
- C{logging/setLevel} (kept per session: log messages below the level are not
  sent) and C{completion/complete} (for the prompt arguments and the
  template's C{id}).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import struct
import sys
import wave
import weakref
import zlib
from typing import Any, Optional

from mcp import types
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.prompts.base import AssistantMessage, Message, UserMessage
from mcp.server.session import ServerSession
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyUrl

SERVER_NAME = "mcp-proxy-conformance-fixture"

#: The RFC 5424 levels of MCP logging, least severe first.
LOG_LEVELS: tuple[str, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)

STATIC_TEXT = "This is the content of the static text resource."
WATCHED_TEXT = "This resource is watched: subscribers are told when it changes."
ERROR_TEXT = "This tool intentionally returns an error for testing"


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """
    A valid PNG of one colour (8-bit RGB, no filter), made with zlib.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _wav(milliseconds: int, rate: int = 8000) -> bytes:
    """
    A valid WAV file of silence (mono, 16-bit PCM).
    """
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * (rate * milliseconds // 1000))
    return buffer.getvalue()


RED_PIXEL_PNG = base64.b64encode(_png(1, 1, (255, 0, 0))).decode("ascii")
BINARY_BLOB = base64.b64encode(_png(2, 2, (0, 128, 255))).decode("ascii")
SILENCE_WAV = base64.b64encode(_wav(100)).decode("ascii")

#: Completion candidates, by prompt argument or template variable name.
COMPLETIONS: dict[str, tuple[str, ...]] = {
    "arg1": ("paris", "park", "party", "test", "testing", "tested"),
    "arg2": ("alpha", "beta", "gamma", "test-value"),
    "id": ("1", "2", "3", "123", "456"),
}


class SessionState:
    """
    What the fixture remembers of each client session: its log level and its
    resource subscriptions. Sessions are weakly referenced, so a closed one
    is forgotten.
    """

    def __init__(self) -> None:
        self._levels: weakref.WeakKeyDictionary[ServerSession, str] = weakref.WeakKeyDictionary()
        self._subscriptions: weakref.WeakKeyDictionary[ServerSession, set[str]] = (
            weakref.WeakKeyDictionary()
        )

    def setLevel(self, session: ServerSession, level: str) -> None:
        self._levels[session] = level

    def logs(self, session: ServerSession, level: str) -> bool:
        """
        Whether a message at C{level} is sent to C{session}: at or above
        the level it set, or at any level when it set none.
        """
        threshold = self._levels.get(session)
        if threshold is None:
            return True
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)

    def subscribe(self, session: ServerSession, uri: str) -> None:
        self._subscriptions.setdefault(session, set()).add(uri)

    def unsubscribe(self, session: ServerSession, uri: str) -> None:
        self._subscriptions.get(session, set()).discard(uri)

    def subscribed(self, session: ServerSession, uri: str) -> bool:
        return uri in self._subscriptions.get(session, set())


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


async def _log(state: SessionState, ctx: Context[Any, Any, Any], level: str, text: str) -> None:
    """
    Send a C{notifications/message} about the current request, unless the
    session's level filters it out.
    """
    session = ctx.session
    if state.logs(session, level):
        await session.send_log_message(
            level=level,  # type: ignore[arg-type]
            data=text,
            logger=SERVER_NAME,
            related_request_id=ctx.request_id,
        )


def buildServer(host: str = "127.0.0.1", port: int = 8000) -> FastMCP:
    """
    The fixture server. C{host} and C{port} matter only over HTTP: the
    loopback names at any port are the only accepted C{Host} and C{Origin}.
    """
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"],
        allowed_origins=[
            "http://127.0.0.1:*",
            "http://localhost:*",
            "http://[::1]:*",
            "http://127.0.0.1",
            "http://localhost",
            "http://[::1]",
        ],
    )
    mcp = FastMCP(
        SERVER_NAME,
        instructions="The fixture of the MCP conformance suite's server scenarios.",
        host=host,
        port=port,
        log_level="WARNING",
        transport_security=security,
    )
    state = SessionState()
    lowlevel = mcp._mcp_server

    # Tools ---------------------------------------------------------------

    @mcp.tool(description="Return a simple text content.", structured_output=False)
    def test_simple_text() -> list[types.ContentBlock]:
        return [_text("This is a simple text response for testing.")]

    @mcp.tool(description="Return an image content (a 1x1 red PNG).", structured_output=False)
    def test_image_content() -> list[types.ContentBlock]:
        return [types.ImageContent(type="image", data=RED_PIXEL_PNG, mimeType="image/png")]

    @mcp.tool(description="Return an audio content (a short WAV).", structured_output=False)
    def test_audio_content() -> list[types.ContentBlock]:
        return [types.AudioContent(type="audio", data=SILENCE_WAV, mimeType="audio/wav")]

    @mcp.tool(description="Return an embedded text resource.", structured_output=False)
    def test_embedded_resource() -> list[types.ContentBlock]:
        return [
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri=AnyUrl("test://embedded-resource"),
                    mimeType="text/plain",
                    text="This is an embedded resource content.",
                ),
            )
        ]

    @mcp.tool(
        description="Return text, image and resource contents together.",
        structured_output=False,
    )
    def test_multiple_content_types() -> list[types.ContentBlock]:
        return [
            _text("Multiple content types test:"),
            types.ImageContent(type="image", data=RED_PIXEL_PNG, mimeType="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri=AnyUrl("test://mixed-content-resource"),
                    mimeType="application/json",
                    text='{"test":"data","value":123}',
                ),
            ),
        ]

    @mcp.tool(
        description="Send three log messages (level info) while running.",
        structured_output=False,
    )
    async def test_tool_with_logging(ctx: Context[Any, Any, Any]) -> list[types.ContentBlock]:
        await _log(state, ctx, "info", "Tool execution started")
        await asyncio.sleep(0.05)
        await _log(state, ctx, "info", "Tool processing data")
        await asyncio.sleep(0.05)
        await _log(state, ctx, "info", "Tool execution completed")
        return [_text("Tool with logging executed successfully")]

    @mcp.tool(
        description="Report progress 0, 50 and 100 of 100 (with a progress token).",
        structured_output=False,
    )
    async def test_tool_with_progress(ctx: Context[Any, Any, Any]) -> list[types.ContentBlock]:
        for step, progress in enumerate((0.0, 50.0, 100.0)):
            if step:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress, 100.0, f"step {step + 1} of 3")
        return [_text(f"Tool with progress executed successfully (token {_progressToken(ctx)!r})")]

    @mcp.tool(
        description="Ask the client's LLM (sampling/createMessage) and return its answer.",
        structured_output=False,
    )
    async def test_sampling(prompt: str, ctx: Context[Any, Any, Any]) -> list[types.ContentBlock]:
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=_text(prompt))],
            max_tokens=100,
            related_request_id=ctx.request_id,
        )
        content = result.content
        answer = content.text if isinstance(content, types.TextContent) else content.type
        return [_text(f"LLM response: {answer}")]

    @mcp.tool(
        description="Ask the user (elicitation/create) for a username and an email.",
        structured_output=False,
    )
    async def test_elicitation(
        message: str, ctx: Context[Any, Any, Any]
    ) -> list[types.ContentBlock]:
        result = await ctx.session.elicit_form(
            message=message,
            requestedSchema={
                "type": "object",
                "properties": {
                    "username": {"type": "string", "description": "User's response"},
                    "email": {"type": "string", "description": "User's email address"},
                },
                "required": ["username", "email"],
            },
            related_request_id=ctx.request_id,
        )
        return [_text(f"User response: action={result.action}, content={result.content}")]

    @mcp.tool(
        description="Elicitation with default values for every primitive type (SEP-1034).",
        structured_output=False,
    )
    async def test_elicitation_sep1034_defaults(
        ctx: Context[Any, Any, Any],
    ) -> list[types.ContentBlock]:
        result = await ctx.session.elicit_form(
            message="Please review and update the form fields with defaults",
            requestedSchema={
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "User name", "default": "John Doe"},
                    "age": {"type": "integer", "description": "User age", "default": 30},
                    "score": {"type": "number", "description": "User score", "default": 95.5},
                    "status": {
                        "type": "string",
                        "description": "User status",
                        "enum": ["active", "inactive", "pending"],
                        "default": "active",
                    },
                    "verified": {
                        "type": "boolean",
                        "description": "Verification status",
                        "default": True,
                    },
                },
                "required": [],
            },
            related_request_id=ctx.request_id,
        )
        return [_text(f"Elicitation completed: action={result.action}, content={result.content}")]

    @mcp.tool(
        description="Elicitation with every enum schema variant (SEP-1330).",
        structured_output=False,
    )
    async def test_elicitation_sep1330_enums(
        ctx: Context[Any, Any, Any],
    ) -> list[types.ContentBlock]:
        result = await ctx.session.elicit_form(
            message="Please select options from the enum fields",
            requestedSchema={
                "type": "object",
                "properties": {
                    "untitledSingle": {
                        "type": "string",
                        "description": "Select one option",
                        "enum": ["option1", "option2", "option3"],
                    },
                    "titledSingle": {
                        "type": "string",
                        "description": "Select one titled option",
                        "oneOf": [
                            {"const": "value1", "title": "First Option"},
                            {"const": "value2", "title": "Second Option"},
                            {"const": "value3", "title": "Third Option"},
                        ],
                    },
                    "legacyEnum": {
                        "type": "string",
                        "description": "Select one option (legacy enumNames)",
                        "enum": ["opt1", "opt2", "opt3"],
                        "enumNames": ["Option One", "Option Two", "Option Three"],
                    },
                    "untitledMulti": {
                        "type": "array",
                        "description": "Select several options",
                        "minItems": 1,
                        "maxItems": 3,
                        "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                    },
                    "titledMulti": {
                        "type": "array",
                        "description": "Select several titled options",
                        "minItems": 1,
                        "maxItems": 3,
                        "items": {
                            "anyOf": [
                                {"const": "value1", "title": "First Choice"},
                                {"const": "value2", "title": "Second Choice"},
                                {"const": "value3", "title": "Third Choice"},
                            ]
                        },
                    },
                },
                "required": [],
            },
            related_request_id=ctx.request_id,
        )
        return [_text(f"Elicitation completed: action={result.action}, content={result.content}")]

    @mcp.tool(description="Always fail: a result with isError true.")
    def test_error_handling() -> types.CallToolResult:
        return types.CallToolResult(content=[_text(ERROR_TEXT)], isError=True)

    # Resources -----------------------------------------------------------

    @mcp.resource(
        "test://static-text",
        name="static-text",
        description="A static text resource.",
        mime_type="text/plain",
    )
    def staticText() -> str:
        return STATIC_TEXT

    @mcp.resource(
        "test://static-binary",
        name="static-binary",
        description="A static binary resource (a PNG image).",
        mime_type="image/png",
    )
    def staticBinary() -> bytes:
        return base64.b64decode(BINARY_BLOB)

    @mcp.resource(
        "test://template/{id}/data",
        name="template",
        description="A resource template: the data of the item {id}.",
        mime_type="application/json",
    )
    def templateData(id: str) -> str:
        return f'{{"id":"{id}","templateTest":true,"data":"Data for ID: {id}"}}'

    @mcp.resource(
        "test://watched-resource",
        name="watched-resource",
        description="A resource to subscribe to.",
        mime_type="text/plain",
    )
    def watchedResource() -> str:
        return WATCHED_TEXT

    @lowlevel.subscribe_resource()
    async def subscribe(uri: AnyUrl) -> None:
        session = lowlevel.request_context.session
        state.subscribe(session, str(uri))

    @lowlevel.unsubscribe_resource()
    async def unsubscribe(uri: AnyUrl) -> None:
        session = lowlevel.request_context.session
        state.unsubscribe(session, str(uri))

    # Prompts -------------------------------------------------------------

    @mcp.prompt(description="A simple prompt without arguments.")
    def test_simple_prompt() -> list[Message]:
        return [UserMessage("This is a simple prompt for testing.")]

    @mcp.prompt(description="A prompt with two required arguments, arg1 and arg2.")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[Message]:
        return [UserMessage(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]

    @mcp.prompt(description="A prompt that embeds the resource resourceUri.")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
        return [
            UserMessage(
                types.EmbeddedResource(
                    type="resource",
                    resource=types.TextResourceContents(
                        uri=AnyUrl(resourceUri),
                        mimeType="text/plain",
                        text="Embedded resource content for testing.",
                    ),
                )
            ),
            UserMessage("Please process the embedded resource above."),
        ]

    @mcp.prompt(description="A prompt with an image.")
    def test_prompt_with_image() -> list[Message]:
        return [
            UserMessage(types.ImageContent(type="image", data=RED_PIXEL_PNG, mimeType="image/png")),
            UserMessage("Please analyze the image above."),
            AssistantMessage("It is a single red pixel."),
        ]

    # Logging and completion ----------------------------------------------

    @lowlevel.set_logging_level()
    async def setLevel(level: types.LoggingLevel) -> None:
        state.setLevel(lowlevel.request_context.session, level)

    @mcp.completion()
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: Optional[types.CompletionContext],
    ) -> types.Completion:
        candidates = COMPLETIONS.get(argument.name, ())
        values = [value for value in candidates if value.startswith(argument.value)]
        return types.Completion(values=values, total=len(values), hasMore=False)

    # The 1.x low-level server always declares resources.subscribe false;
    # this one serves subscriptions, so it says so.
    declared = lowlevel.get_capabilities

    def capabilities(
        notificationOptions: Any, experimentalCapabilities: dict[str, dict[str, Any]]
    ) -> types.ServerCapabilities:
        result = declared(notificationOptions, experimentalCapabilities)
        if result.resources is not None:
            result.resources.subscribe = True
        return result

    lowlevel.get_capabilities = capabilities  # type: ignore[method-assign]
    return mcp


def _progressToken(ctx: Context[Any, Any, Any]) -> Any:
    meta = ctx.request_context.meta
    return meta.progressToken if meta is not None else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    commands = parser.add_subparsers(dest="transport", required=True)
    commands.add_parser("stdio", help="serve one client on stdin/stdout")
    http = commands.add_parser("http", help="serve Streamable HTTP at http://HOST:PORT/mcp")
    http.add_argument("--port", type=int, required=True)
    http.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    options = parser.parse_args(argv)
    if options.transport == "stdio":
        buildServer().run("stdio")
    else:
        buildServer(options.host, options.port).run("streamable-http")
    return 0


if __name__ == "__main__":
    sys.exit(main())
