"""`moe-train plan`: memory and step-time models of a parallel layout, a search over layouts, a report.

May import config, model, parallel and utils (like train); cli imports it.
"""
