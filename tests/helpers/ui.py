"""The dashboard as a person sees it in a real Chromium: axe-core's accessibility rules in light and dark,
keyboard reach, and the screenshots in docs/screenshots (taken by the tests, so they cannot go stale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlplane.config import PROJECT_ROOT

AXE = Path(__file__).parent.parent / "vendor" / "axe-core" / "axe.min.js"  # axe-core from npm, vendored (MPL-2.0)
SHOTS = PROJECT_ROOT / "docs" / "screenshots"
BLOCKING = ("serious", "critical")  # axe's impacts that fail a page
AXE_SOURCE = AXE.read_text()
RUN_AXE = """
const done = arguments[arguments.length - 1];
axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map(v => (
  {id: v.id, impact: v.impact, help: v.help, at: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))));
"""


def scheme(driver: Any, dark: bool) -> None:
    """Light or dark as the system would ask for it (prefers-color-scheme), through the DevTools protocol."""
    value = "dark" if dark else "light"
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": value}]}
    )


def violations(driver: Any) -> list[str]:
    """axe-core's serious and critical violations on the page as shown now."""
    driver.set_script_timeout(60)
    if not driver.execute_script("return typeof axe !== 'undefined'"):  # once per page load (650 KB to parse)
        driver.execute_script(AXE_SOURCE)
    found = driver.execute_async_script(RUN_AXE)
    return [f"{v['id']} ({v['impact']}): {v['help']} at {v['at']}" for v in found if v["impact"] in BLOCKING]


def looked_at(driver: Any, name: str) -> None:
    """The page passes axe in light and in dark, and both are kept as docs/screenshots/NAME-light|dark.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        for dark in (False, True):
            scheme(driver, dark)
            found = violations(driver)
            assert found == [], (name, "dark" if dark else "light", found)
            shot = SHOTS / f"{name}-{'dark' if dark else 'light'}.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
    finally:
        scheme(driver, False)


def reached_by_keyboard(driver: Any, element_id: str, presses: int = 300) -> bool:
    """Tab from the top of the page until `element_id` has the focus (every control on the way is reachable)."""
    from selenium.webdriver.common.keys import Keys

    driver.find_element("tag name", "body").click()
    for _ in range(presses):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        if driver.switch_to.active_element.get_attribute("id") == element_id:
            return True
    return False
