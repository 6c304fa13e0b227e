# The Debian package (make deb) and the package tests in a Debian 12 VM
# (make vm-test). Included by the Makefile.
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog)
DEB_ARCH := $(shell dpkg --print-architecture)
DEB := dist/unitbox_$(DEB_VERSION)_$(DEB_ARCH).deb
WHEELHOUSE := .cache/wheelhouse
DEB_BUILD := .cache/deb-build
DEB_APT_PACKAGES := dpkg-dev debhelper fakeroot lintian python3 python3-venv python3-dev python3-lxml libsystemd-dev pkg-config gcc
VM_APT_PACKAGES := qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client
VM_PYTEST_ARGS ?=

.PHONY: deb deb-deps wheelhouse lintian vm-deps vm-image vm-test deb-clean

define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else echo "==> Debian packages present: $(1)"; fi
endef

deb-deps:  ## install the Debian packages that build the .deb (dpkg-dev, debhelper, lintian, …)
	$(call apt_ensure,$(DEB_APT_PACKAGES))

vm-deps:  ## install qemu, debootstrap and what the VM tests need
	$(call apt_ensure,$(VM_APT_PACKAGES) curl)

wheelhouse: $(WHEELHOUSE)/.complete  ## download the pinned wheels (and pystemd's sdist) the offline .deb build uses
$(WHEELHOUSE)/.complete: packaging/requirements.txt packaging/build-requirements.txt
	$(call apt_ensure,python3-venv)
	@echo "==> pip for downloading: .cache/pip-download (python3 -m venv)"
	@test -x .cache/pip-download/bin/pip || python3 -m venv .cache/pip-download
	@echo "==> downloading the wheelhouse into $(WHEELHOUSE) (packaging/requirements.txt, build-requirements.txt)"
	@rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	@.cache/pip-download/bin/pip download --disable-pip-version-check --progress-bar on -d $(WHEELHOUSE) --no-deps \
	    --only-binary :all: -r packaging/build-requirements.txt
	@.cache/pip-download/bin/pip download --disable-pip-version-check --progress-bar on -d $(WHEELHOUSE) --no-deps \
	    --only-binary :all: --no-binary pystemd -r packaging/requirements.txt
	@ls $(WHEELHOUSE) | sed 's/^/    /'
	@touch $@

deb: $(DEB)  ## build dist/unitbox_<version>_<arch>.deb (offline, from the wheelhouse) and lintian it
DEB_INPUTS := $(shell find daemon/unitbox packaging units -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null) \
	pyproject.toml README.md SECURITY.md $(wildcard docs/*.md)
$(DEB): $(WHEELHOUSE)/.complete $(DEB_INPUTS) $(PLAYGROUND) | deb-deps
	@echo "==> checking versions: debian/changelog $(DEB_VERSION), pyproject.toml $$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
	@[ "$(DEB_VERSION)" = "$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" ] || \
	    { echo "packaging/debian/changelog and pyproject.toml disagree on the version" >&2; exit 1; }
	@echo "==> staging the source tree in $(DEB_BUILD)/unitbox-$(DEB_VERSION)"
	@rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/unitbox-$(DEB_VERSION)
	@tar -c --exclude=__pycache__ --exclude='*.egg-info' --exclude=packaging/debian \
	    daemon units packaging pyproject.toml README.md SECURITY.md docs | tar -x -C $(DEB_BUILD)/unitbox-$(DEB_VERSION)
	@cp -r packaging/debian $(DEB_BUILD)/unitbox-$(DEB_VERSION)/debian
	@cp -r $(WHEELHOUSE) $(DEB_BUILD)/unitbox-$(DEB_VERSION)/wheelhouse
	@echo "==> dpkg-buildpackage -b, with no network (unshare --net): building the venv and pystemd"
	@cd $(DEB_BUILD)/unitbox-$(DEB_VERSION) && unshare --net -- \
	    dpkg-buildpackage -b -us -uc > ../build.log 2>&1 \
	    || { tail -n 40 ../build.log; echo "dpkg-buildpackage failed: $(DEB_BUILD)/build.log" >&2; exit 1; }
	@grep -E '^(dh |\s+dh_|   dh_)' $(DEB_BUILD)/build.log | sed 's/^\s*/    /' | head -n 40 || true
	@mkdir -p dist && cp $(DEB_BUILD)/unitbox_$(DEB_VERSION)_$(DEB_ARCH).deb $@
	@echo "==> built $@ ($$(du -h $@ | cut -f1)); Depends: $$(dpkg-deb -f $@ Depends)"
	@$(MAKE) --no-print-directory lintian

lintian:  ## lintian the built .deb (fails on errors; warnings need an override with a reason)
	@echo "==> lintian $(DEB)"
	@lintian --fail-on error --tag-display-limit 0 $(DEB) 2>&1 | grep -v "root privileges" | sed 's/^/    /'; \
	    rc=$${PIPESTATUS[0]}; [ $$rc -eq 0 ] && echo "    lintian: no errors" || { echo "    lintian failed ($$rc)"; exit $$rc; }

vm-image: vm-deps  ## build (once; cached in .cache/vm) the Debian 12 VM image
	@bash tests/vm/image.sh

vm-test: deb vm-image venv  ## install the .deb in a Debian 12 VM under qemu and check the operator story
	@echo "==> pytest -m vm tests/vm (boots the VM: qemu, $$(bash tests/vm/vm.sh accel))"
	@UNITBOX_VM_TEST=1 UNITBOX_DEB=$(DEB) $(BIN)/pytest -m vm -v -s -p no:cacheprovider tests/vm $(VM_PYTEST_ARGS)
	@bash tests/vm/vm.sh check-clean

deb-clean:  ## remove the built package, the wheelhouse and the VM image
	rm -rf $(DEB_BUILD) $(WHEELHOUSE) .cache/pip-download .cache/vm dist/unitbox_*.deb
