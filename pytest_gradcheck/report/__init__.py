"""Renderers: profiles, findings and baseline comparisons as text, Markdown, JSON and charts. They decide nothing."""
