"""Headless Chromium for the report tests (Debian's chromium and chromium-driver, driven by
Selenium, nothing downloaded): ``chrome()`` gives a driver, or skips the test saying why."""

import os
import shutil

import pytest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"


def why_not() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra: pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.isfile(path) and not shutil.which(os.path.basename(path)):
            return f"{path} is missing (Debian: apt-get install chromium chromium-driver; .ci/run installs them)"
    return None


def chrome(width: int = 1400, height: int = 1000):
    """A headless Chromium whose console log can be read (``driver.get_log("browser")``)."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER if os.path.isfile(CHROMEDRIVER) else shutil.which("chromedriver"))
    return webdriver.Chrome(service=service, options=options)
