"""
Packaging for mcp-proxy.

The twistd plugin lives in twisted/plugins/ (no __init__.py there or in
twisted/), so that package is listed by hand.
"""

from setuptools import find_packages, setup

setup(
    name="mcp-proxy-twisted",
    version="0.1.0",
    description="An MCP (Model Context Protocol) proxy server on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*", "examples"])
    + ["twisted.plugins"],
    package_data={"twisted.plugins": ["mcpproxy_plugin.py"], "mcp_proxy": ["py.typed"]},
    install_requires=[
        "twisted>=26.10.0",
        "klein>=24.8.0",
        "txpostgres>=1.7.0",
        "psycopg2-binary>=2.9.13",
        "treq>=26.7.0",
        "attrs>=26.1.0",
        "zope.interface>=8.7",
        "prometheus-client>=0.26.0",
        "txredisapi>=1.6.0",
    ],
    extras_require={
        "test": [
            "pytest>=9.2.0",
            "pytest-twisted>=1.14.3",
            "mcp>=1.30.0",
        ],
        "lint": [
            "ruff>=0.17.6",
            "mypy>=2.4.1",
            "mypy-zope>=1.0.17",
        ],
    },
    entry_points={
        "console_scripts": ["mcpproxy-admin = mcp_proxy.admin:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
